"""Pixel attributions: how much each input pixel matters to a class score. All from captum.

- saliency: Simonyan, Vedaldi, Zisserman, "Deep Inside Convolutional Networks", ICLR-W 2014 (arXiv:1312.6034).
- guided backprop: Springenberg et al., "Striving for Simplicity: The All Convolutional Net",
  ICLR-W 2015 (arXiv:1412.6806). captum overrides the backward pass of every ``nn.ReLU`` module,
  which is why every ReLU of the ResNets here, the one after each residual sum included, is its own
  module.
- guided Grad-CAM: Selvaraju et al., ICCV 2017 (arXiv:1610.02391), guided backprop times Grad-CAM.
- integrated gradients: Sundararajan, Taly, Yan, "Axiomatic Attribution for Deep Networks", ICML 2017
  (arXiv:1703.01365).
- SmoothGrad: Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017 (arXiv:1706.03825).
- occlusion: Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014
  (arXiv:1311.2901), Sec. 4.2.

Every function takes a model, a batch of network inputs (B, C, H, W) and a target (class index,
(B,) tensor, or ``None`` for the predicted class) and returns attributions of the input's shape.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cnnlab.errors import UserError
from cnnlab.viz.cam import Target, predicted
from cnnlab.viz.layers import resolve

__all__ = ["ATTRIBUTIONS", "attribute", "guided_backprop", "guided_grad_cam", "integrated_gradients",
           "occlusion", "saliency", "smoothgrad"]


def _captum(attributor, x: Tensor, **kwargs) -> Tensor:
    # captum needs gradients even when the caller is inside torch.no_grad(); its notice that it
    # hooks the ReLUs for guided backprop is expected here, not news to the user.
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        return attributor.attribute(x.detach().clone().requires_grad_(True), **kwargs).detach()


def saliency(model: nn.Module, x: Tensor, target: Target = None) -> Tensor:
    """|∂y_c/∂x|, the vanilla gradient's magnitude."""
    from captum.attr import Saliency

    return _captum(Saliency(model), x, target=predicted(model, x, target), abs=True)


def guided_backprop(model: nn.Module, x: Tensor, target: Target = None) -> Tensor:
    """The gradient with only positive gradients passed back through every ReLU."""
    from captum.attr import GuidedBackprop

    return _captum(GuidedBackprop(model), x, target=predicted(model, x, target))


def guided_grad_cam(model: nn.Module, x: Tensor, target: Target = None, layer: str = "conv5_x") -> Tensor:
    """Guided backprop times the Grad-CAM of ``layer``, upsampled bilinearly."""
    from captum.attr import GuidedGradCam

    method = GuidedGradCam(model, resolve(model, layer))
    return _captum(method, x, target=predicted(model, x, target), interpolate_mode="bilinear")


def integrated_gradients(model: nn.Module, x: Tensor, target: Target = None, baseline: Tensor | None = None,
                         steps: int = 256) -> Tensor:
    """(x − x′) ⊙ the path integral of the gradient from ``baseline`` x′ (default zero: the mean colour).

    Complete: the attributions of an image sum to y_c(x) − y_c(x′), up to the quadrature error. The
    trapezoid rule, not captum's default Gauss–Legendre: along the path a ReLU network is piecewise
    linear, with kinks that a high-order rule on few nodes can miss badly.
    """
    from captum.attr import IntegratedGradients

    return _captum(IntegratedGradients(model), x, target=predicted(model, x, target),
                   baselines=0.0 if baseline is None else baseline, n_steps=steps, method="riemann_trapezoid",
                   internal_batch_size=max(len(x), 1) * min(steps, 64))


def smoothgrad(model: nn.Module, x: Tensor, target: Target = None, samples: int = 25, noise: float = 0.15,
               seed: int = 0) -> Tensor:
    """The mean saliency over ``samples`` copies of x with Gaussian noise of σ = ``noise`` × the input range."""
    from captum.attr import NoiseTunnel, Saliency

    sigma = noise * float(x.max() - x.min())
    t = predicted(model, x, target)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return _captum(NoiseTunnel(Saliency(model)), x, target=t, nt_type="smoothgrad", nt_samples=samples,
                       nt_samples_batch_size=samples, stdevs=sigma)
    finally:
        torch.random.set_rng_state(state)


def occlusion(model: nn.Module, x: Tensor, target: Target = None, window: int | None = None,
              stride: int | None = None) -> Tensor:
    """The drop of y_c when a ``window``-pixel square (default 1/8 of the image) is set to zero, per pixel."""
    from captum.attr import Occlusion

    side = x.shape[-1]
    window = window or max(2, side // 8)
    stride = stride or max(1, window // 2)
    with torch.no_grad():
        return Occlusion(model).attribute(x, target=predicted(model, x, target), baselines=0.0,
                                          sliding_window_shapes=(x.shape[1], window, window),
                                          strides=(x.shape[1], stride, stride),
                                          perturbations_per_eval=64).detach()


ATTRIBUTIONS: dict[str, Callable[..., Tensor]] = {
    "saliency": saliency,
    "guided-backprop": guided_backprop,
    "guided-grad-cam": guided_grad_cam,
    "integrated-gradients": integrated_gradients,
    "smoothgrad": smoothgrad,
    "occlusion": occlusion,
}


def attribute(model: nn.Module, x: Tensor, target: Target = None, kind: str = "saliency", **options) -> Tensor:
    """The attribution named ``kind`` (one of :data:`ATTRIBUTIONS`)."""
    if kind not in ATTRIBUTIONS:
        raise UserError(f"unknown attribution {kind!r}; choose one of: {', '.join(ATTRIBUTIONS)}")
    return ATTRIBUTIONS[kind](model, x, target, **options)
