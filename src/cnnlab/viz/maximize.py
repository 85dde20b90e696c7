"""Activation maximisation: the image that most excites a channel or a class.

Plain gradient ascent on pixels gives high-frequency noise that excites the unit but shows
nothing. The regularisation here is that of Olah, Mordvintsev, Schubert, "Feature Visualization",
Distill 2017 (doi:10.23915/distill.00007), after Mordvintsev et al.'s lucid:

- the image is parameterised in a decorrelated space: a Fourier spectrum scaled by 1/frequency^d
  (so every frequency is about equally easy to change; d = 1.5 rather than lucid's 1, because a
  32 px image has so few frequencies that d = 1 still leaves pixel-scale noise) and a colour space whitened by the square root of
  ImageNet's colour correlation, squashed into [0, 1] by a sigmoid;
- before each step the image is randomly padded and jittered, scaled and rotated (transformation
  robustness), so the picture must work everywhere, not in one pixel alignment.

The class objective is the log-probability of the class, so that the result is confidently that
class, not merely a large logit shared with the others (Simonyan et al. 2014, arXiv:1312.6034).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.core.spec import Preprocess
from cnnlab.viz.layers import forward_until, recording, require_channel

__all__ = ["FourierImage", "maximize", "objective", "random_transform"]

# Square root of ImageNet's RGB correlation (lucid's color_correlation_svd_sqrt).
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


class FourierImage(nn.Module):
    """A batch of images held as decorrelated Fourier coefficients; calling it gives pixels in [0, 1]."""

    def __init__(self, batch: int, channels: int, size: int, decay: float = 1.0, std: float = 0.01,
                 seed: int = 0) -> None:
        super().__init__()
        fy = torch.fft.fftfreq(size)[:, None]
        fx = torch.fft.rfftfreq(size)[None, :]
        freqs = (fy.pow(2) + fx.pow(2)).sqrt()
        # 1/f scaling, capped at the lowest non-zero frequency (with the orthonormal inverse FFT this
        # is lucid's scaling exactly).
        self.register_buffer("scale", 1.0 / freqs.clamp_min(1.0 / size).pow(decay))
        g = torch.Generator().manual_seed(seed)
        self.spectrum = nn.Parameter(std * torch.randn(batch, channels, size, size // 2 + 1, 2, generator=g))
        self.size = size
        color = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()
        self.register_buffer("color", color if channels == 3 else torch.eye(channels))

    def forward(self) -> Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        image = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho") / 4
        # einsum hands back a channels-last layout; torch 2.14's CPU convolution backward corrupts
        # memory on such inputs at small widths, so the image is made contiguous before any conv.
        image = torch.einsum("bchw,dc->bdhw", image, self.color).contiguous()
        return torch.sigmoid(image)


def random_transform(u: Tensor, generator: torch.Generator, jitter: int, angle: float = 5.0,
                     scales: Sequence[float] = (1.0, 0.975, 1.025, 0.95, 1.05)) -> Tensor:
    """Pad, jitter, scale, rotate and jitter again, one random draw per image (lucid's standard transforms)."""
    b, _, h, w = u.shape
    u = F.pad(u, (2 * jitter,) * 4, mode="reflect" if 2 * jitter < min(h, w) else "replicate")
    size = u.shape[-1]
    rnd = torch.rand(b, 4, generator=generator)
    s = torch.tensor(scales)[torch.randint(len(scales), (b,), generator=generator)]
    theta = (rnd[:, 0] * 2 - 1) * math.radians(angle)
    shift = (rnd[:, 1:3] * 2 - 1) * (2 * jitter / size)
    cos, sin = torch.cos(theta) / s, torch.sin(theta) / s
    affine = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(affine.to(u), list(u.shape), align_corners=False)
    u = F.grid_sample(u, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    top, left = (torch.randint(0, 2 * jitter + 1, (2,), generator=generator) + jitter).tolist()
    top, left = min(top, size - h), min(left, size - w)
    return u[..., top:top + h, left:left + w]


def objective(model: nn.Module, x: Tensor, layer: str | None, channels: Tensor | None,
               classes: Tensor | None) -> Tensor:
    """Per-image objective: a channel's mean activation at ``layer``, or a class's log-probability."""
    if classes is not None:
        return model(x).log_softmax(1).gather(1, classes[:, None])[:, 0]
    with recording(model, [layer], detach=False, stop=True) as store:
        forward_until(model, x, store)
    acts = store[layer]
    require_channel(acts, layer, int(channels.max()))
    picked = acts[torch.arange(len(x), device=acts.device), channels.to(acts.device)]
    return picked.flatten(1).mean(1) if picked.ndim > 1 else picked


def maximize(model: nn.Module, image_size: int, mean: Sequence[float], std: Sequence[float], *,
             layer: str | None = None, channels: Sequence[int] | None = None, classes: Sequence[int] | None = None,
             steps: int = 256, lr: float = 0.1, in_channels: int = 3, transforms: bool = True,
             polish: float = 0.25, decay: float = 1.5, seed: int = 0) -> Tensor:
    """Images (network inputs, one per channel or class) that maximise the objective.

    Give ``layer`` and ``channels`` for channel visualisation or ``classes`` for class models.
    ``steps=0`` returns the random start, the reference against which the gain is measured.
    The last ``polish`` fraction of the steps runs without the random transforms: by then the
    picture's structure is set, and these steps let it reach the objective at the one alignment it
    will be shown in (a small network at 32 px otherwise never gets confident about some classes).
    """
    if (classes is None) == (channels is None):
        raise ValueError("give either channels (with a layer) or classes")
    device = next(model.parameters()).device
    picks = torch.tensor(list(classes if classes is not None else channels), device=device)
    param = FourierImage(len(picks), in_channels, image_size, decay=decay, seed=seed).to(device)
    m, s = Preprocess(1, in_channels, mean, std).stats(device)
    opt = torch.optim.Adam(param.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    jitter = max(1, image_size // 28)
    with torch.enable_grad():
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            u = param()
            if transforms and step < steps * (1 - polish):
                u = random_transform(u, g, jitter)
            value = objective(model, (u - m) / s, layer, None if classes is not None else picks,
                              picks if classes is not None else None)
            (-value.sum()).backward()
            opt.step()
    with torch.no_grad():
        return (param() - m) / s
