"""DeepDream: amplify whatever a layer sees in a given image.

A. Mordvintsev, C. Olah, M. Tyka, "Inceptionism: Going Deeper into Neural Networks", Google
Research blog, 2015, and their deepdream notebook: gradient ascent on ½‖A‖² of a layer's
activations A (or of one channel's), with random jitter between steps, steps normalised by the
mean gradient magnitude, and octaves (start on a downscaled copy, then add the detail found to
each larger scale). The image is changed in pixel space [0, 1] (see :mod:`cnnlab.viz.shape` for
``preprocess``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.core.spec import Preprocess
from cnnlab.viz.layers import default_layer, forward_until, recording, require_channel
from cnnlab.viz.shape import Channels, Target, per_image, pixel_space, uses

__all__ = ["dream"]


@uses("layer", "channels")
def dream(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
          channels: Channels = None, preprocess: Preprocess | None = None, steps: int = 20,
          step_size: float = 0.02, octaves: int = 3, octave_scale: float = 1.4, jitter: int | None = None,
          seed: int = 0) -> Tensor:
    """The batch ``x`` dreamed at ``layer`` (all its channels, or each image's one of ``channels``);
    returns network inputs normalised as ``x``."""
    layer = layer or default_layer(model, x)
    picks = None if channels is None else per_image(channels, x, "channels")
    space = pixel_space(preprocess, x)
    base = space.to_pixels(x)
    side = x.shape[-1]
    sizes = [max(8, round(side / octave_scale ** k)) for k in range(octaves - 1, -1, -1)]
    jitter = jitter if jitter is not None else max(1, side // 16)
    g = torch.Generator().manual_seed(seed)
    detail = torch.zeros_like(base[..., : sizes[0], : sizes[0]])
    for size in sizes:
        octave_base = F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
        detail = F.interpolate(detail, size=(size, size), mode="bilinear", align_corners=False)
        u = (octave_base + detail).detach()
        for _ in range(steps):
            dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist()
            shifted = u.roll((dy, dx), (2, 3)).requires_grad_(True)
            with torch.enable_grad(), recording(model, [layer], detach=False, stop=True) as store:
                forward_until(model, space.to_input(shifted), store)
                acts = store[layer]
                if picks is not None:
                    require_channel(acts, layer, picks)
                    acts = acts[torch.arange(len(x), device=acts.device), picks]
                (grad,) = torch.autograd.grad(acts.pow(2).sum() / 2, shifted)
            grad = grad.roll((-dy, -dx), (2, 3))
            u = (u + step_size * grad / grad.abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-12)).clamp(0, 1)
        detail = u - octave_base
    return space.to_input(u).detach()
