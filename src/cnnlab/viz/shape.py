"""The one calling shape of every method in :mod:`cnnlab.viz`, after captum's ``attribute()``::

    method(model, x, *, target=None, layer=None, channels=None, **options) -> Tensor

``x`` is a batch (B, C, H, W) of network inputs, normalised as the model was trained.
``target`` is the class to explain: one index for every image, one per image, or ``None`` for each
image's predicted class. ``layer`` is a Table 1 row (``conv1`` … ``conv5_x``, ``fc``) or a module path,
``None`` for the last spatial feature block (conv5_x). ``channels`` picks a channel of that layer:
one for every image, one per image, or ``None`` for the method's default. A method that has no use
for one of the three refuses it by name instead of ignoring it.

The methods that optimise pixels (``invert``, ``dream``, ``maximize``) work on the image in [0, 1]
that ``x`` shows, and learn how that image becomes network input from the option ``preprocess``,
the run's :class:`~cnnlab.core.spec.Preprocess` (default ``None``: no normalisation, so ``x`` is
itself an image in [0, 1]). Like every other method they return network input, normalised as ``x`` is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from cnnlab.core.errors import UserError
from cnnlab.core.spec import Preprocess

__all__ = ["Channels", "PixelSpace", "Target", "per_image", "pixel_space", "target_classes", "unused"]

Target = int | Sequence[int] | Tensor | None
Channels = int | Sequence[int] | Tensor | None


def per_image(value: int | Sequence[int] | Tensor, x: Tensor, name: str) -> Tensor:
    """``value`` as one index per image of ``x``, a (B,) long tensor on ``x``'s device."""
    if isinstance(value, Tensor):
        t = value.to(x.device).long()
    else:
        t = torch.tensor(value if isinstance(value, int) else list(value), dtype=torch.long, device=x.device)
    if t.ndim == 0:
        return t.expand(len(x))
    if t.ndim != 1 or len(t) not in (1, len(x)):
        raise UserError(f"`{name}` gives {len(t) if t.ndim == 1 else list(t.shape)} values for {len(x)} images; "
                        "give one for all, or one per image")
    return t.expand(len(x))


def target_classes(model: nn.Module, x: Tensor, target: Target) -> Tensor:
    """Each image's class to explain, (B,): ``target`` where given, else the model's prediction."""
    if target is None:
        with torch.no_grad():
            return model(x).argmax(1)
    return per_image(target, x, "target")


def unused(method: str, **given: object) -> None:
    """Refuse, by name, a parameter of the shape that ``method`` has no use for."""
    for name, value in given.items():
        if value is not None:
            raise UserError(f"{method} does not use `{name}`")


class PixelSpace(NamedTuple):
    """The way between an image in [0, 1] and network input."""

    to_input: Callable[[Tensor], Tensor]
    to_pixels: Callable[[Tensor], Tensor]


def pixel_space(preprocess: Preprocess | None, x: Tensor) -> PixelSpace:
    """The pixel space of network inputs like ``x``: the ``preprocess`` normalisation, or none."""
    if preprocess is None:
        return PixelSpace(lambda u: u, lambda v: v.clamp(0, 1))
    return PixelSpace(preprocess.normalizer().to(x), preprocess.to_pixels)
