"""Pixel attributions: how much each input pixel matters to a class score.

- saliency: Simonyan, Vedaldi, Zisserman, "Deep Inside Convolutional Networks", ICLR-W 2014 (arXiv:1312.6034).
- guided backprop: Springenberg et al., "Striving for Simplicity: The All Convolutional Net",
  ICLR-W 2015 (arXiv:1412.6806). The guided rule applies at every ReLU the forward pass runs
  (:mod:`cnnlab.viz.relu_rules`), so it stays exact for models whose ReLUs are reused, in place or
  functional (torchvision's and timm's), where captum's per-module hooks would not be.
- guided Grad-CAM: Selvaraju et al., ICCV 2017 (arXiv:1610.02391), guided backprop times Grad-CAM.
- integrated gradients: Sundararajan, Taly, Yan, "Axiomatic Attribution for Deep Networks", ICML 2017
  (arXiv:1703.01365).
- SmoothGrad: Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017 (arXiv:1706.03825);
  written here, because captum's NoiseTunnel takes one σ for the whole batch.
- occlusion: Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014
  (arXiv:1311.2901), Sec. 4.2.

Every function has the shape of :mod:`cnnlab.viz.shape` and returns attributions of the input's
shape; only guided Grad-CAM has a ``layer``, and none has ``channels``. Saliency, SmoothGrad and
occlusion are captum's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from captum.attr import Occlusion, Saliency
from torch import Tensor, nn

from cnnlab.core.errors import UserError
from cnnlab.viz.cam import grad_cam
from cnnlab.viz.relu_rules import GUIDED, relu_rule
from cnnlab.viz.shape import Channels, Target, target_classes, uses

__all__ = ["ATTRIBUTIONS", "PathIntegral", "guided_backprop", "guided_grad_cam", "integrated_gradients",
           "occlusion", "path_integral", "saliency", "smoothgrad"]


def _captum(attributor, x: Tensor, **kwargs) -> Tensor:
    # captum needs gradients even when the caller is inside torch.no_grad(); its notice that it
    # hooks the ReLUs for guided backprop is expected here, not news to the user.
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        return attributor.attribute(x.detach().clone().requires_grad_(True), **kwargs).detach()


@uses("target")
def saliency(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
             channels: Channels = None) -> Tensor:
    """|∂y_c/∂x|, the vanilla gradient's magnitude."""
    return _captum(Saliency(model), x, target=target_classes(model, x, target), abs=True)


@uses("target")
def guided_backprop(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
                    channels: Channels = None) -> Tensor:
    """The gradient with only positive gradients passed back through every ReLU."""
    t = target_classes(model, x, target)
    inp = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), relu_rule(GUIDED):
        scores = model(inp).gather(1, t[:, None])
        (grad,) = torch.autograd.grad(scores.sum(), inp)
    return grad.detach()


@uses("target", "layer")
def guided_grad_cam(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
                    channels: Channels = None) -> Tensor:
    """Guided backprop times the Grad-CAM of ``layer`` (default: the last spatial feature block), upsampled
    bilinearly: captum's ``GuidedGradCam`` with the guided rule at every ReLU."""
    t = target_classes(model, x, target)
    return guided_backprop(model, x, target=t) * grad_cam(model, x, target=t, layer=layer)


@dataclass
class PathIntegral:
    """Integrated gradients with their own error bound."""

    attributions: Tensor  # (B, C, H, W)
    gap: Tensor  # (B,) relative completeness gap, see :func:`path_integral`
    steps: Tensor  # (B,) trapezoid intervals each image needed


def path_integral(model: nn.Module, x: Tensor, *, target: Target = None, baseline: Tensor | None = None,
                  tolerance: float = 0.01, steps: int = 32, max_steps: int = 4096,
                  batch_size: int = 128) -> PathIntegral:
    """Integrated gradients, refined until each image's completeness gap is below ``tolerance``.

    The attributions (x − x′) ⊙ ∫₀¹ ∇f_c(x′ + t(x − x′)) dt sum to f_c(x) − f_c(x′) exactly; the
    trapezoid rule with n intervals misses by a quadrature error. Per image, the gap is that miss
    |Σ attributions − (f_c(x) − f_c(x′))| divided by ∫₀¹ |d f_c/dt| dt, the total change of the score
    along the path. The latter equals |f_c(x) − f_c(x′)| when the score moves one way along the path,
    and stays meaningful when the two ends happen to score alike (a plain ratio to a near-zero
    difference would demand any precision). Intervals double until the gap is below ``tolerance``
    or ``max_steps`` is reached; doubling keeps every node already computed, so each refinement costs
    only the new midpoints, and only for the images that still need it.

    The trapezoid rule rather than captum's Gauss–Legendre: along the path a ReLU network is piecewise
    linear, and a high-order rule on few nodes can miss its kinks badly, without saying so.
    """
    if steps < 1 or max_steps < steps:
        raise ValueError(f"steps must be at least 1 and at most max_steps (got steps={steps}, max_steps={max_steps})")
    x = x.detach()
    base = torch.zeros_like(x) if baseline is None else baseline.detach().to(x).expand_as(x)
    target = target_classes(model, x, target)
    delta = x - base
    n = len(x)

    def directional(idx: Tensor, ts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """At path positions ``ts`` (K,) of images ``idx``: summed gradients (len(idx), C, H, W),
        summed |d f/dt|, and the scores at the positions (len(idx), K)."""
        points = base[idx, None] + ts.view(1, -1, 1, 1, 1).to(x) * delta[idx, None]  # (I, K, C, H, W)
        flat = points.flatten(0, 1)
        labels = target[idx].repeat_interleave(len(ts))
        grads, scores = [], []
        with torch.enable_grad():
            for chunk, y in zip(flat.split(batch_size), labels.split(batch_size)):
                chunk = chunk.clone().requires_grad_(True)
                s = model(chunk).gather(1, y[:, None])[:, 0]
                (g,) = torch.autograd.grad(s.sum(), chunk)
                grads.append(g)
                scores.append(s.detach())
        g = torch.cat(grads).view(len(idx), len(ts), *x.shape[1:])
        slope = (g * delta[idx, None]).flatten(2).sum(2).abs()  # |d f/dt| at each position
        return g.sum(1), slope.sum(1), torch.cat(scores).view(len(idx), len(ts))

    everyone = torch.arange(n, device=x.device)
    ends, end_slopes, end_scores = directional(everyone, torch.tensor([0.0, 1.0]))
    gain = end_scores[:, 1] - end_scores[:, 0]
    # Trapezoid sums kept as (the two ends' half weights) + (the inner nodes).
    grad_sum, slope_sum = ends / 2, end_slopes / 2
    intervals = torch.full((n,), steps, dtype=torch.long, device=x.device)
    inner_t = torch.arange(1, steps, dtype=torch.float64) / steps
    if steps > 1:
        g, s, _ = directional(everyone, inner_t)
        grad_sum, slope_sum = grad_sum + g, slope_sum + s

    def gap_of(idx: Tensor) -> Tensor:
        k = intervals[idx].to(x.dtype)
        total = (delta[idx] * grad_sum[idx]).flatten(1).sum(1) / k
        variation = (slope_sum[idx] / k).clamp(min=torch.finfo(x.dtype).tiny)
        return (total - gain[idx]).abs() / variation

    gap = gap_of(everyone)
    while True:
        todo = everyone[(gap > tolerance) & (intervals * 2 <= max_steps)]
        if not len(todo):
            break
        for m in intervals[todo].unique().tolist():  # images at the same resolution refine together
            idx = todo[intervals[todo] == m]
            midpoints = (torch.arange(m, dtype=torch.float64) + 0.5) / m
            g, s, _ = directional(idx, midpoints)
            grad_sum[idx] += g
            slope_sum[idx] += s
            intervals[idx] = 2 * m
            gap[idx] = gap_of(idx)
    attributions = delta * grad_sum / intervals.view(-1, 1, 1, 1).to(x.dtype)
    return PathIntegral(attributions.detach(), gap.detach(), intervals)


@uses("target")
def integrated_gradients(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
                         channels: Channels = None, baseline: Tensor | None = None, tolerance: float = 0.01,
                         steps: int = 32, max_steps: int = 4096) -> Tensor:
    """(x − x′) ⊙ the path integral of the gradient from ``baseline`` x′ (default zero: the mean colour).

    Complete to within ``tolerance`` of the score's change along the path (see :func:`path_integral`);
    a warning names the images for which ``max_steps`` trapezoid intervals were not enough.
    """
    result = path_integral(model, x, target=target, baseline=baseline, tolerance=tolerance, steps=steps,
                           max_steps=max_steps)
    short = (result.gap > tolerance).nonzero().flatten().tolist()
    if short:
        warnings.warn(f"integrated gradients: image(s) {short} still miss completeness by "
                      f"{', '.join(f'{100 * float(result.gap[i]):.2g}%' for i in short)} after {max_steps} steps "
                      f"(tolerance {100 * tolerance:g}%); raise max_steps for a more exact map", stacklevel=3)
    return result.attributions


@uses("target")
def smoothgrad(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
               channels: Channels = None, samples: int = 25, noise: float = 0.15, seed: int = 0,
               batch_size: int = 64) -> Tensor:
    """The mean saliency |∂y_c/∂x| over ``samples`` noisy copies of each image.

    As Smilkov et al. define it (Sec. 3), the noise is per image: Gaussian with σ = ``noise`` × (that
    image's max − min). Each image's noise comes from its own generator, seeded with ``seed``:
    ``torch.randn((samples, C, H, W), generator=torch.Generator().manual_seed(seed), dtype=x.dtype)``,
    drawn on the CPU. So an image's map is the same alone or in any batch, and the global random
    state is left alone.
    """
    if samples < 1:
        raise UserError(f"`samples` must be at least 1 (got {samples})")
    x = x.detach()
    t = target_classes(model, x, target)
    flat = x.flatten(1)
    sigma = noise * (flat.amax(1) - flat.amin(1))
    noisy = torch.cat([
        x[i] + sigma[i] * torch.randn((samples, *x.shape[1:]), generator=torch.Generator().manual_seed(seed),
                                      dtype=x.dtype).to(x.device)
        for i in range(len(x))])
    labels = t.repeat_interleave(samples)
    grads = []
    with torch.enable_grad():
        for chunk, y in zip(noisy.split(batch_size), labels.split(batch_size)):
            chunk = chunk.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(model(chunk).gather(1, y[:, None]).sum(), chunk)
            grads.append(g.abs())
    return torch.cat(grads).view(len(x), samples, *x.shape[1:]).mean(1)


@uses("target")
def occlusion(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
              channels: Channels = None, window: int | None = None, stride: int | None = None) -> Tensor:
    """The drop of y_c when a ``window``-pixel square (default 1/8 of the image) is set to zero, per pixel."""
    side = x.shape[-1]
    window = window or max(2, side // 8)
    stride = stride or max(1, window // 2)
    with torch.no_grad():
        return Occlusion(model).attribute(x, target=target_classes(model, x, target), baselines=0.0,
                                          sliding_window_shapes=(x.shape[1], window, window),
                                          strides=(x.shape[1], stride, stride),
                                          perturbations_per_eval=64).detach().to(x.dtype)  # captum ends in float32


ATTRIBUTIONS: dict[str, Callable[..., Tensor]] = {
    "saliency": saliency,
    "guided-backprop": guided_backprop,
    "guided-grad-cam": guided_grad_cam,
    "integrated-gradients": integrated_gradients,
    "smoothgrad": smoothgrad,
    "occlusion": occlusion,
}

