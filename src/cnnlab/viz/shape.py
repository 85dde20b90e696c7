"""The one calling shape of every method in :mod:`cnnlab.viz`, after captum's ``attribute()``::

    method(model, x, *, target=None, layer=None, channels=None, **options) -> Tensor

``x`` is a batch (B, C, H, W) of network inputs, normalised as the model was trained.
``target`` is the class to explain: one index for every image, one per image, or ``None`` for each
image's predicted class. ``layer`` is a Table 1 row (``conv1`` … ``conv5_x``, ``fc``) or a module path,
``None`` for the last spatial feature block (conv5_x). ``channels`` picks a channel of that layer:
one for every image, one per image, or ``None`` for the method's default. A method that has no use
for one of the three refuses it by name instead of ignoring it: each method declares the ones it uses
with :func:`uses`, which refuses the others and is what :mod:`cnnlab.inspect`'s registry reads.

The methods that optimise pixels (``invert``, ``dream``, ``maximize``) work on the image in [0, 1]
that ``x`` shows, and learn how that image becomes network input from the option ``preprocess``,
the run's :class:`~cnnlab.core.spec.Preprocess` (default ``None``: no normalisation, so ``x`` is
itself an image in [0, 1]). Like every other method they return network input, normalised as ``x`` is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from cnnlab.core.errors import UserError
from cnnlab.core.spec import Preprocess

__all__ = ["PARAMETERS", "Channels", "PixelSpace", "Target", "per_image", "pixel_space", "target_classes", "uses"]

PARAMETERS = ("target", "layer", "channels")

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


Method = TypeVar("Method", bound=Callable[..., Tensor])


def uses(*modes: str | frozenset[str]) -> Callable[[Method], Method]:
    """Declare the parameters of the shape a method uses, and refuse the others by name.

    Each argument is one parameter, or a set of them that go together where a method has several
    exclusive ways to be called (``maximize``: a class, or channels of a layer; the method itself
    says which mix it refuses). The wrapped method keeps the declaration as ``modes`` (a tuple of
    sets) and ``uses`` (their union).
    """
    groups = tuple(frozenset([m]) if isinstance(m, str) else frozenset(m) for m in modes)
    together = all(len(g) == 1 for g in groups)
    declared = (frozenset().union(*groups),) if together else groups
    used = frozenset().union(*declared)

    def wrap(method: Method) -> Method:
        @functools.wraps(method)
        def checked(model: nn.Module, x: Tensor, **options: object) -> Tensor:
            for name in PARAMETERS:
                if name not in used and options.get(name) is not None:
                    raise UserError(f"{method.__name__} does not use `{name}`")
            return method(model, x, **options)

        checked.modes = declared  # type: ignore[attr-defined]
        checked.uses = used  # type: ignore[attr-defined]
        return checked  # type: ignore[return-value]

    return wrap


class PixelSpace(NamedTuple):
    """The way between an image in [0, 1] and network input."""

    to_input: Callable[[Tensor], Tensor]
    to_pixels: Callable[[Tensor], Tensor]


def pixel_space(preprocess: Preprocess | None, x: Tensor) -> PixelSpace:
    """The pixel space of network inputs like ``x``: the ``preprocess`` normalisation, or none."""
    if preprocess is None:
        return PixelSpace(lambda u: u, lambda v: v.clamp(0, 1))
    return PixelSpace(preprocess.normalizer().to(x), preprocess.to_pixels)
