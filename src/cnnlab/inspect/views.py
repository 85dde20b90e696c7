"""A method of the registry on an opened run, as the user chose: :func:`show` resolves the choices
(images, layers, targets, channels, kinds, steps and their defaults) and returns one result per figure.

Every value of a multi-valued choice is honoured (a result per layer, per channel, a row per target),
or refused by name where the method can use only one.
"""

from __future__ import annotations

from collections.abc import Callable

from cnnlab.core.errors import UserError
from cnnlab.inspect.inspector import Inspection
from cnnlab.inspect.registry import METHODS, Choices, Method
from cnnlab.inspect.results import Images

__all__ = ["images_for", "method", "show"]


def method(name: str) -> Method:
    """The registry's record of method ``name``, or a ``UserError`` listing them."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def images_for(inspection: Inspection, m: Method, choices: Choices) -> Images:
    """The images method ``m`` looks at: the files, the test images or the count chosen, else its default."""
    return inspection.images(files=choices.image, indices=choices.index, count=choices.count, default=m.images,
                             spread_out=m.spread)


def _filters(i: Inspection, c: Choices) -> list:
    return [i.filters(layer, c.channel or (0,), c.count or 32) for layer in c.layer or [i.first_layer]]


def _features(i: Inspection, c: Choices) -> list:
    images = images_for(i, METHODS["features"], c)
    return [i.features(images, layer) for layer in c.layer or [i.first_layer, i.last_layer]]


def _top_images(i: Inspection, c: Choices) -> list:
    return [i.top_images(layer, channel, c.count or 9) for layer in c.layer or [i.last_layer]
            for channel in c.channel or (0,)]


def _deconv(i: Inspection, c: Choices) -> list:
    images = images_for(i, METHODS["deconv"], c)
    return [i.deconv(images, layer, c.channel, c.count or 4) for layer in c.layer or [i.last_layer]]


def _invert(i: Inspection, c: Choices) -> list:
    layers = list(c.layer) or i.feature_layers
    images = images_for(i, METHODS["invert"], c)
    return [i.invert(images, layers, 300 if c.steps is None else c.steps)]


def _maximize(i: Inspection, c: Choices) -> list:
    steps = 256 if c.steps is None else c.steps
    if c.target:
        if c.layer or c.channel:
            raise UserError("maximize draws classes (`target`) or channels of a layer (`layer`, `channel`), "
                            "not both at once")
        return [i.maximize_classes(i.targets(c.target), steps)]
    found = []
    for layer in c.layer or [i.last_layer]:
        if layer == "fc":  # its channels are the classes
            found.append(i.maximize_classes(list(c.channel) or list(range(len(i.classes))), steps))
        else:
            found.append(i.maximize_channels(layer, list(c.channel) or list(range(c.count or 8)), steps))
    return found


def _dream(i: Inspection, c: Choices) -> list:
    images = images_for(i, METHODS["dream"], c)
    return [i.dream(images, layer, 20 if c.steps is None else c.steps) for layer in c.layer or [i.dream_layer]]


def _cam(i: Inspection, c: Choices) -> list:
    kinds, targets = METHODS["cam"].pick(c.kind), i.targets(c.target)
    images = images_for(i, METHODS["cam"], c)
    return [i.explain(images, kinds, layer=layer, targets=targets) for layer in c.layer or [i.last_layer]]


def _attribute(i: Inspection, c: Choices) -> list:
    kinds = METHODS["attribute"].pick(c.kind)
    if len(c.layer) > 1:
        raise UserError(f"attribute takes one `layer` (for guided-grad-cam), not {len(c.layer)}")
    if c.layer and "guided-grad-cam" not in kinds:
        raise UserError("`layer` is used by the guided-grad-cam attribution alone; add it to `kind` or drop `layer`")
    if c.steps is not None and "integrated-gradients" not in kinds:
        raise UserError("`steps` is used by the integrated-gradients attribution alone; add it to `kind` or drop "
                        "`steps`")
    targets = i.targets(c.target)
    images = images_for(i, METHODS["attribute"], c)
    options = {"integrated-gradients": dict(max_steps=c.steps, steps=min(32, c.steps))} if c.steps else {}
    return [i.explain(images, kinds, layer=c.layer[0] if c.layer else None, targets=targets, options=options)]


def _embedding(i: Inspection, c: Choices) -> list:
    return [i.embedding(c.count)]


VIEWS: dict[str, Callable[[Inspection, Choices], list]] = {
    "filters": _filters, "features": _features, "top-images": _top_images, "deconv": _deconv, "invert": _invert,
    "maximize": _maximize, "dream": _dream, "cam": _cam, "attribute": _attribute, "embedding": _embedding,
}


def show(inspection: Inspection, name: str, choices: Choices) -> list:
    """The results of method ``name`` (any of the registry but ``sanity``, which
    :func:`cnnlab.inspect.checks.sanity` runs), one per figure, for ``choices``."""
    m = method(name)
    m.check(choices)
    inspection.layers(choices.layer)
    return VIEWS[name](inspection, choices)
