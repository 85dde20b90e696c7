"""Backward rules for ReLUs, for the methods that redefine them: guided backprop and the deconvnet.

- guided backprop (Springenberg et al. 2015): the gradient passes a ReLU only where its input was positive
  *and* the gradient coming down is positive: relu(g) · [x > 0].
- deconvnet (Zeiler & Fergus 2014, Sec. 2.1): the signal coming down is rectified, whatever the forward
  input was: relu(g).

captum applies such rules with backward hooks on ``nn.ReLU`` modules, which is exact only when every ReLU
is its own module, called once per forward and not in place; as captum's documentation advises, models
that reuse a ReLU module (torchvision's ResNet blocks call theirs twice), apply ReLUs in place, or call
``F.relu`` must have them replaced for the attribution. Here they are replaced at the call instead of in
the model: while :func:`relu_rule` is open, every ReLU the forward pass applies — ``nn.ReLU`` modules,
reused or in place, ``F.relu``, ``torch.relu``, ``Tensor.relu`` — is an autograd function with the
rule's backward. Forward values are unchanged; the model is untouched. Other activations (Hardswish, SiLU,
GELU …) keep their own gradients: the rules are defined for ReLUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["DECONV", "GUIDED", "relu_rule"]


class _Guided(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clamp_min(0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return g.clamp_min(0) * (y > 0).to(g.dtype)


class _Deconv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g.clamp_min(0)


GUIDED = _Guided
DECONV = _Deconv

# Every way a forward pass applies a ReLU; in-place ones return a new tensor, which callers use
# (``x = relu(x)``), as nn.ReLU(inplace=True) and every model we know of do.
_RELUS = {torch.relu, torch.relu_, F.relu, F.relu_, Tensor.relu, Tensor.relu_}


class _Mode(TorchFunctionMode):
    def __init__(self, rule: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.rule = rule
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELUS:
            self.calls += 1
            return self.rule.apply(args[0])
        return func(*args, **(kwargs or {}))


@contextmanager
def relu_rule(rule: type[torch.autograd.Function]) -> Iterator[_Mode]:
    """While open, every ReLU of a forward pass backpropagates by ``rule`` (:data:`GUIDED` or :data:`DECONV`);
    the mode yielded counts the ReLUs it replaced."""
    with _Mode(rule) as mode:
        yield mode
