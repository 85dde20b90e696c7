"""Feature maps: every channel a layer outputs for an image (Zeiler & Fergus 2014; Yosinski et al. 2015).

The assignment's Fig. 8–10 showed conv1 (64 × 112×112) and conv5_x (512 × 7×7); its author could
fit 220 of the 512 conv5_x channels. Here every channel is kept and drawn in one labelled grid.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cnnlab.viz.layers import capture

__all__ = ["feature_maps"]


def feature_maps(model: nn.Module, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """The output (B, C, H, W) of each named layer for the batch ``x`` (normalised network input)."""
    return capture(model, x, layers)
