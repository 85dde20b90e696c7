"""Activation maximisation: the image that most excites a channel or a class.

Plain gradient ascent on pixels gives high-frequency noise that excites the unit but shows
nothing. The regularisation here is that of Olah, Mordvintsev, Schubert, "Feature Visualization",
Distill 2017 (doi:10.23915/distill.00007), after Mordvintsev et al.'s lucid:

- the image is parameterised in a decorrelated space: a Fourier spectrum scaled by 1/frequency^d
  (so every frequency is about equally easy to change; d = 1, lucid's) and a colour space whitened
  by the square root of the colour covariance (:func:`color_sqrt`; lucid's constant is ImageNet's,
  :mod:`cnnlab.inspect` estimates it from the run's own training data), squashed into [0, 1] by a
  sigmoid;
- before each step the image is randomly padded and jittered (by a sixteenth of its side), scaled
  (±10 %) and rotated (±10°), lucid's transformation robustness at the image's own size, so the
  picture must work everywhere, not in one pixel alignment.

These defaults are the ones under which class models drawn on one run are best taken for their
class by independently trained runs (``benchmarks/transfer.py``): a picture of the class rather
than noise that fools one network. Lucid's 512 steps and a decay of 1.5 did worse there; no
transforms, or a decay of 2, much worse.

The class objective is the log-probability of the class, so that the result is confidently that
class, not merely a large logit shared with the others (Simonyan et al. 2014, arXiv:1312.6034).

The optimisation starts from the images ``x`` (see :mod:`cnnlab.viz.shape` for ``preprocess``);
lucid's start, faint Fourier noise, is :func:`fourier_noise`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.core.errors import UserError
from cnnlab.core.spec import Preprocess
from cnnlab.viz.layers import default_layer, forward_until, recording, require_channel
from cnnlab.viz.shape import Channels, Target, per_image, pixel_space, target_classes, uses

__all__ = ["IMAGENET_COLOR_SQRT", "STEPS", "FourierImage", "color_sqrt", "fourier_noise", "gram_similarity",
           "maximize", "objective", "random_transform"]

# Square root of ImageNet's RGB correlation (lucid's color_correlation_svd_sqrt): the colours used when
# no data is at hand.
IMAGENET_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
STEPS = 256  # optimisation steps of a maximisation unless told otherwise


def color_sqrt(pixels: Tensor, chunk: int = 4096) -> Tensor:
    """The square root ``M`` of the colour covariance of images ``pixels`` (N, C, H, W), uint8 or in
    [0, 1], in pixel values in [0, 1]: ``M @ M.T`` is the covariance. As lucid's
    ``color_correlation_svd_sqrt``, ``M = U·sqrt(S)`` of the covariance's SVD ``U·S·Uᵀ``. Read ``chunk``
    images at a time, so that a large training set is never held as floats."""
    c = pixels.shape[1]
    total, outer, n = torch.zeros(c, dtype=torch.float64), torch.zeros(c, c, dtype=torch.float64), 0
    scale = 255.0 if pixels.dtype == torch.uint8 else 1.0
    for start in range(0, len(pixels), chunk):
        values = pixels[start:start + chunk].to(torch.float64).div_(scale).transpose(0, 1).reshape(c, -1)
        total += values.sum(1)
        outer += values @ values.T
        n += values.shape[1]
    if n < 2:
        raise ValueError("the colour covariance needs at least two pixels")
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    u, s, _ = torch.linalg.svd(cov)
    u = u * torch.where(u[0] < 0, -1.0, 1.0)  # the SVD's signs are arbitrary; lucid's first row is positive
    return (u * s.clamp_min(0).sqrt()).float()


class FourierImage(nn.Module):
    """A batch of images held as decorrelated Fourier coefficients, starting at ``pixels``
    (B, C, H, W) in [0, 1]; calling it gives pixels in [0, 1]. ``color``: the square root of the colour
    covariance (:func:`color_sqrt`; default ImageNet's, for three channels)."""

    def __init__(self, pixels: Tensor, decay: float = 1.0, color: Tensor | None = None) -> None:
        super().__init__()
        h, w = pixels.shape[-2:]
        fy = torch.fft.fftfreq(h)[:, None]
        fx = torch.fft.rfftfreq(w)[None, :]
        freqs = (fy.pow(2) + fx.pow(2)).sqrt()
        # 1/f scaling, capped at the lowest non-zero frequency (with the orthonormal inverse FFT this
        # is lucid's scaling exactly).
        self.register_buffer("scale", (1.0 / freqs.clamp_min(1.0 / max(h, w)).pow(decay)).to(pixels))
        if color is None:
            color = IMAGENET_COLOR_SQRT if pixels.shape[1] == 3 else torch.eye(pixels.shape[1])
        if color.shape != (pixels.shape[1],) * 2:
            raise ValueError(f"`color` is {tuple(color.shape)}; the images have {pixels.shape[1]} channels")
        # scaled as lucid scales it: its largest column of norm 1
        self.register_buffer("color", (color / color.norm(dim=0).max()).to(pixels))
        self.size = (h, w)
        self.spectrum = nn.Parameter(self._spectrum_of(pixels.detach()))

    def _spectrum_of(self, pixels: Tensor) -> Tensor:
        # forward() undone; the sigmoid never reaches 0 or 1, so those are moved just inside.
        image = torch.logit(pixels.clamp(1e-3, 1 - 1e-3)) * 4
        image = torch.einsum("bdhw,cd->bchw", image, torch.linalg.inv(self.color))
        spectrum = torch.fft.rfft2(image, s=self.size, norm="ortho") / self.scale
        return torch.view_as_real(spectrum).contiguous()

    def forward(self) -> Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        image = torch.fft.irfft2(spectrum, s=self.size, norm="ortho") / 4
        # einsum hands back a channels-last layout; torch 2.14's CPU convolution backward corrupts
        # memory on such inputs at small widths, so the image is made contiguous before any conv.
        image = torch.einsum("bchw,dc->bdhw", image, self.color).contiguous()
        return torch.sigmoid(image)


def fourier_noise(shape: Sequence[int], *, decay: float = 1.5, std: float = 0.01, seed: int = 0,
                  color: Tensor | None = None) -> Tensor:
    """Pixels in [0, 1] of lucid's starting images: random Fourier coefficients of σ = ``std``,
    after the same 1/frequency scaling and ``color`` as :class:`FourierImage`, so a faint coloured haze
    on grey."""
    image = FourierImage(torch.full(tuple(shape), 0.5), decay=decay, color=color)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        image.spectrum.copy_(std * torch.randn(image.spectrum.shape, generator=g))
        return image()


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


def _one_objective(target: Target, layer: str | None, channels: Channels) -> None:
    if channels is None and layer is not None:
        raise UserError("`layer` goes with `channels`; a class (`target`) is maximised at the output")
    if channels is not None and target is not None:
        raise UserError("give `target` (a class) or `channels` (of a layer), not both")


def objective(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
              channels: Channels = None) -> Tensor:
    """Per-image objective: each image's channel's mean activation at ``layer`` when ``channels`` are
    given, else the log-probability of its ``target`` class."""
    return _objective(model, x, target=target, layer=layer, channels=channels)[0]


def _objective(model: nn.Module, x: Tensor, *, target: Target, layer: str | None, channels: Channels,
               at: str | None = None) -> tuple[Tensor, Tensor | None]:
    """:func:`objective`, and the activations of layer ``at`` from the same forward pass (None: not kept)."""
    _one_objective(target, layer, channels)
    if channels is None:
        with recording(model, [at] if at else [], detach=False) as store:
            value = model(x).log_softmax(1).gather(1, target_classes(model, x, target)[:, None])[:, 0]
        return value, store.get(at) if at else None
    layer = layer or default_layer(model, x)
    picks = per_image(channels, x, "channels")
    names = [layer] if at in (None, layer) else [layer, at]
    with recording(model, names, detach=False, stop=True) as store:
        forward_until(model, x, store)
    acts = store[layer]
    require_channel(acts, layer, picks)
    picked = acts[torch.arange(len(x), device=acts.device), picks]
    return (picked.flatten(1).mean(1) if picked.ndim > 1 else picked), store.get(at) if at else None


def gram_similarity(acts: Tensor, groups: Tensor) -> Tensor:
    """Lucid's diversity objective (``objectives.diversity``), per image: the summed cosine similarity of its
    Gram matrix of ``acts`` (B, C, h, w) with those of the other images of its group (``groups`` (B,): the
    images that maximise the same unit), divided by the group's size. Its sum over a group is lucid's value
    for a batch of that group alone; maximising with it subtracted pushes the group's images apart in style."""
    flat = acts.flatten(2)
    grams = F.normalize((flat @ flat.transpose(1, 2)).flatten(1), dim=1, eps=1e-10)
    others = (groups[:, None] == groups[None, :]) & ~torch.eye(len(groups), dtype=torch.bool, device=groups.device)
    sizes = others.sum(1, keepdim=True) + 1
    return ((grams @ grams.T) * others / sizes).sum(1)


@uses("target", {"layer", "channels"})
def maximize(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
             channels: Channels = None, preprocess: Preprocess | None = None, steps: int = STEPS, lr: float = 0.1,
             transforms: bool = True, jitter: int | None = None, angle: float = 10.0, scale: float = 0.1,
             polish: float = 0.25, decay: float = 1.0, color: Tensor | None = None, seed: int = 0,
             diversity: float = 0.0, progress: Callable[[float], None] | None = None) -> Tensor:
    """The images ``x`` changed to maximise, each, the :func:`objective`: its channel of ``layer``
    when ``channels`` are given, else its ``target`` class (default: the class it is predicted as).

    Returns network inputs normalised as ``x``; ``steps=0`` returns ``x`` as the parameterisation holds it.
    The last ``polish`` fraction of the steps runs without the random transforms: by then the
    picture's structure is set, and these steps let it reach the objective at the one alignment it
    will be shown in (a small network at 32 px otherwise never gets confident about some classes).
    The transforms jitter by up to ``jitter`` pixels (default: one per 16 of the image's side), rotate
    by up to ``angle`` degrees and scale by up to ``scale`` either way. ``color`` is the square root of
    the colour covariance to decorrelate by (:func:`color_sqrt`; default ImageNet's).
    ``diversity`` > 0 subtracts that multiple of :func:`gram_similarity` at ``layer`` (for a class: the
    last spatial feature block) from the objective, so the images that maximise the same unit (channel or
    class) in one batch become different pictures of it (Olah et al. 2017, "Diversity").
    ``progress`` is told the fraction of the steps done after each one.
    """
    _one_objective(target, layer, channels)
    if channels is None:
        target = target_classes(model, x, target)  # the start's class, kept while the image changes
    space = pixel_space(preprocess, x)
    param = FourierImage(space.to_pixels(x), decay=decay, color=color)
    opt = torch.optim.Adam(param.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    jitter = max(1, x.shape[-1] // 16) if jitter is None else jitter
    scales = (1.0, 1 - scale / 2, 1 + scale / 2, 1 - scale, 1 + scale)
    at = (layer or default_layer(model, x)) if diversity else None
    groups = per_image(channels if channels is not None else target, x, "channels")
    with torch.enable_grad():
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            u = param()
            if transforms and step < steps * (1 - polish):
                u = random_transform(u, g, jitter, angle, scales)
            value, acts = _objective(model, space.to_input(u), target=target, layer=layer, channels=channels, at=at)
            loss = -value.sum()
            if acts is not None:
                loss = loss + diversity * gram_similarity(acts, groups).sum()
            loss.backward()
            opt.step()
            if progress is not None:
                progress((step + 1) / steps)
    with torch.no_grad():
        return space.to_input(param())
