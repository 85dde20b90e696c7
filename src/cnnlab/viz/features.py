"""Feature maps: every channel a layer outputs for an image (Zeiler & Fergus 2014; Yosinski et al. 2015).

The assignment's Fig. 8–10 showed conv1 (64 × 112×112) and conv5_x (512 × 7×7); its author could
fit 220 of the 512 conv5_x channels. Here every channel is kept and drawn in one labelled grid.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cnnlab.viz.layers import capture, default_layer, require_channel
from cnnlab.viz.shape import Channels, Target, per_image, uses

__all__ = ["feature_maps"]


@uses("layer", "channels")
def feature_maps(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
                 channels: Channels = None) -> Tensor:
    """The output (B, C, h, w) of ``layer`` for the batch ``x``; with ``channels``, each image's
    channel alone, (B, 1, h, w)."""
    layer = layer or default_layer(model, x)
    maps = capture(model, x, [layer])[layer]
    if channels is None:
        return maps
    picks = per_image(channels, x, "channels")
    require_channel(maps, layer, picks)
    return maps[torch.arange(len(x), device=maps.device), picks][:, None]
