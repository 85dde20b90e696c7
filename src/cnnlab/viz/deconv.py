"""Deconvnet projections: a channel's activation mapped back to pixels (Zeiler & Fergus 2014).

M. D. Zeiler, R. Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014
(arXiv:1311.2901), Sec. 2.1. All activations of the layer but the chosen channel's strongest
one are set to zero and the result is passed back down: unpooling with the max-pool switches,
rectification, and the transposed filters. Back-propagation through the network does exactly that
except at the ReLUs, where it masks by the forward input's sign; the deconvnet instead rectifies
the signal coming down. So this is autograd with every ReLU's backward replaced by that rule, however
the model applies its ReLUs (:mod:`cnnlab.viz.relu_rules`; batch norm, in eval mode an affine map, passes
back through its scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.viz.layers import default_layer, forward_until, recording, require_channel, require_feature_maps
from cnnlab.viz.relu_rules import DECONV, relu_rule
from cnnlab.viz.shape import Channels, Target, per_image, uses

__all__ = ["deconv"]


@uses("layer", "channels")
def deconv(model: nn.Module, x: Tensor, *, target: Target = None, layer: str | None = None,
           channels: Channels = None, strongest_only: bool = True) -> Tensor:
    """The projection (B, C, H, W) of each image's channel at ``layer`` to the input (default: the
    channel with the strongest activation on that image).

    ``strongest_only`` keeps only the channel's maximum activation, as in Zeiler & Fergus's figures;
    otherwise the whole feature map is projected.
    """
    layer = layer or default_layer(model, x)
    with relu_rule(DECONV):
        with torch.enable_grad(), recording(model, [layer], detach=False, stop=True) as store:
            inp = x.detach().clone().requires_grad_(True)
            forward_until(model, inp, store)
            acts = require_feature_maps(store[layer], layer)
            if channels is None:
                picks = acts.detach().flatten(2).amax(2).argmax(1)
            else:
                picks = per_image(channels, x, "channels")
                require_channel(acts, layer, picks)
            a = acts[torch.arange(len(x), device=acts.device), picks].flatten(1)
            if strongest_only:
                keep = F.one_hot(a.argmax(1), a.shape[1]).to(a.dtype)
                signal = (a * keep).detach()
            else:
                signal = a.detach()
            (grad,) = torch.autograd.grad(a, inp, grad_outputs=signal)
    return grad.detach()
