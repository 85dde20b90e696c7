"""Class activation maps at a convolutional layer, upsampled to the input.

- Grad-CAM: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
  Localization", ICCV 2017 (arXiv:1610.02391). Computed with captum's ``LayerGradCam``.
- Grad-CAM++: Chattopadhay et al., "Grad-CAM++: Improved Visual Explanations for Deep Convolutional
  Networks", WACV 2018 (arXiv:1710.11063), closed form for an exponential of the class score.
- Score-CAM: Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
  Networks", CVPR-W 2020 (arXiv:1910.01279).
- LayerCAM: Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for
  Localization", IEEE TIP 2021.

Every function has the shape of :mod:`cnnlab.viz.shape` (no ``channels``: a CAM weighs them all)
and returns (B, 1, H, W) non-negative maps at the input's size, unscaled (rendering scales them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import Tensor, nn

from cnnlab.viz.layers import default_layer, forward_until, module_at, recording, require_feature_maps
from cnnlab.viz.shape import Channels, Target, target_classes, uses

__all__ = ["CAMS", "grad_cam", "grad_cam_pp", "layer_cam", "score_cam", "upsample"]


def upsample(maps: Tensor, x: Tensor) -> Tensor:
    """Layer-resolution maps to the input's size, bilinearly (Selvaraju et al. 2017, Sec. 3)."""
    return F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)


def activations_and_gradients(model: nn.Module, x: Tensor, target: Tensor, layer: str) -> tuple[Tensor, Tensor]:
    """The layer's activations A (B, K, h, w) and ∂y_c/∂A for each image's target class c."""
    with torch.enable_grad(), recording(model, [layer], detach=False) as store:
        logits = model(x)
        acts = require_feature_maps(store[layer], layer)
        (grads,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), acts)
    return acts.detach(), grads


@uses("target", "layer")
def grad_cam(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
             channels: Channels = None) -> Tensor:
    """ReLU(Σ_k α_k A_k) with α_k the spatial mean of ∂y_c/∂A_k, upsampled bilinearly."""
    layer = layer or default_layer(model, x)
    t = target_classes(model, x, target)
    with torch.enable_grad():
        maps = LayerGradCam(model, module_at(model, layer)).attribute(x, target=t, relu_attributions=True)
    return upsample(require_feature_maps(maps, layer).detach(), x)


@uses("target", "layer")
def grad_cam_pp(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
                channels: Channels = None) -> Tensor:
    """Grad-CAM++: channel weights Σ_ij α_ij ReLU(g_ij) with the paper's closed-form α (Eq. 19)."""
    acts, g = activations_and_gradients(model, x, target_classes(model, x, target), layer or default_layer(model, x))
    g2, g3 = g.pow(2), g.pow(3)
    denominator = 2 * g2 + acts.sum((2, 3), keepdim=True) * g3
    alpha = torch.where(g != 0, g2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator)),
                        torch.zeros_like(g))
    weights = (alpha * F.relu(g)).sum((2, 3), keepdim=True)
    return upsample(F.relu((weights * acts).sum(1, keepdim=True)), x)


@uses("target", "layer")
def layer_cam(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
              channels: Channels = None) -> Tensor:
    """LayerCAM: ReLU(Σ_k ReLU(g_k) ⊙ A_k), a weight per location instead of per channel."""
    acts, g = activations_and_gradients(model, x, target_classes(model, x, target), layer or default_layer(model, x))
    return upsample(F.relu((F.relu(g) * acts).sum(1, keepdim=True)), x)


@uses("target", "layer")
@torch.no_grad()
def score_cam(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
              channels: Channels = None, batch_size: int = 64) -> Tensor:
    """Score-CAM: each channel, upsampled and scaled to [0, 1], masks the input; how much each masked
    input raises the target's logit, softmax-normalised over the channels, weighs them (no gradients).

    Wang et al. describe two readings. Algorithm 1 of the paper scores channel k by the increase of
    the class's *logit*, S_k = f_c(X ∘ H_k) − f_c(X_b), and weighs it by softmax_k(S_k); the authors'
    released code instead weighs by the class's *probability* on X ∘ H_k, with no softmax over
    channels. This is Algorithm 1 (as pytorch-grad-cam's ScoreCAM): a logit is unbounded, so the
    weights keep the full spread of what each channel shows for *this* class, and the softmax over
    channels makes f_c(X_b) cancel, so no baseline image has to be chosen. (cnnlab once took the
    softmax over classes and then again over channels: weights in [0, 1] before exp() differ by a
    factor of at most e, so every class got nearly the same map.)
    """
    layer = layer or default_layer(model, x)
    t = target_classes(model, x, target)
    with recording(model, [layer], stop=True) as store:
        forward_until(model, x, store)
    acts = require_feature_maps(store[layer], layer)
    b, k = acts.shape[:2]
    masks = upsample(acts.flatten(0, 1)[:, None], x).view(b, k, *x.shape[-2:])
    lo = masks.amin((2, 3), keepdim=True)
    masks = (masks - lo) / (masks.amax((2, 3), keepdim=True) - lo).clamp_min(torch.finfo(x.dtype).tiny)
    scores = torch.empty(b, k, device=x.device, dtype=x.dtype)
    for i in range(b):
        for start in range(0, k, batch_size):
            m = masks[i, start:start + batch_size, None]
            scores[i, start:start + batch_size] = model(x[i:i + 1] * m)[:, t[i]]
    weights = scores.softmax(1)[:, :, None, None]
    return upsample(F.relu((weights * acts).sum(1, keepdim=True)), x)


CAMS: dict[str, Callable[..., Tensor]] = {
    "grad-cam": grad_cam,
    "grad-cam++": grad_cam_pp,
    "score-cam": score_cam,
    "layer-cam": layer_cam,
}
