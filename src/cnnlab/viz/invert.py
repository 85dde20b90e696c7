"""Inverting a representation: the image a layer "sees" (Mahendran & Vedaldi 2015).

A. Mahendran, A. Vedaldi, "Understanding Deep Image Representations by Inverting Them", CVPR 2015
(arXiv:1412.0035). Find x minimising

    ‖Φ(x) − Φ(x₀)‖² / ‖Φ(x₀)‖²  +  λ_α ‖x − m‖_α^α  +  λ_TV Σ ((∂_h x)² + (∂_w x)²)^{β/2}

from random noise, where Φ is the network up to a layer, the α-norm (α = 6) keeps pixels in range
and the total-variation prior (β = 2) favours piecewise-smooth images. The image is optimised in
pixel space [0, 1] (see :mod:`cnnlab.viz.shape` for ``preprocess``); m is the image the network
sees as zero input, the mean colour of its training data, so the α-norm is taken of the
mean-subtracted image as in the paper. Both priors are averaged per pixel so their weights do not
depend on its size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cnnlab.core.spec import Preprocess
from cnnlab.viz.layers import default_layer, forward_until, recording
from cnnlab.viz.shape import Channels, Target, pixel_space, uses

__all__ = ["feature_distance", "invert", "total_variation"]


def total_variation(u: Tensor, beta: float = 2.0) -> Tensor:
    """Mean over pixels of ((∂_h u)² + (∂_w u)²)^{β/2}, with forward differences."""
    dh = u[..., 1:, :-1] - u[..., :-1, :-1]
    dw = u[..., :-1, 1:] - u[..., :-1, :-1]
    return (dh.pow(2) + dw.pow(2) + 1e-8).pow(beta / 2).mean()


def _represent(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    with recording(model, [layer], detach=False, stop=True) as store:
        forward_until(model, x, store)
    return store[layer]


def feature_distance(model: nn.Module, x: Tensor, reference: Tensor, layer: str) -> Tensor:
    """‖Φ(x) − Φ(x₀)‖ / ‖Φ(x₀)‖ per image (B,), x₀ the ``reference``: the paper's reconstruction error."""
    with torch.no_grad():
        a, b = _represent(model, x, layer).flatten(1), _represent(model, reference, layer).flatten(1)
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)


@uses("layer")
def invert(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
           channels: Channels = None, preprocess: Preprocess | None = None, steps: int = 300, lr: float = 0.05,
           alpha: float = 6.0, alpha_weight: float = 1e-3, tv_weight: float = 0.05, seed: int = 0) -> Tensor:
    """Reconstruct the batch ``x`` from its representation at ``layer``.

    Returns network inputs (normalised as ``x``) whose representation matches ``x``'s.
    """
    layer = layer or default_layer(model, x)
    space = pixel_space(preprocess, x)
    m = space.to_pixels(torch.zeros_like(x[:1]))
    with torch.no_grad():
        goal = _represent(model, x, layer).detach()
    norm = goal.flatten(1).pow(2).sum(1).clamp_min(1e-12)
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = (m + 0.05 * torch.randn(x.shape, generator=g).to(x)).clamp(0, 1).requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr * 0.05)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            rep = _represent(model, space.to_input(u), layer)
            fit = ((rep - goal).flatten(1).pow(2).sum(1) / norm).sum()
            prior = alpha_weight * (u - m).abs().pow(alpha).mean() + tv_weight * total_variation(u)
            (fit + len(u) * prior).backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                u.clamp_(0, 1)
    return space.to_input(u).detach()
