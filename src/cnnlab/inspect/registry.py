"""The one registry of what cnnlab shows of a network: each method, what it takes and what it gives.

Two kinds of record, after captum (one ``attribute(inputs, target=…)`` for every method) and
torchvision's ``weights.transforms()`` / timm's ``PretrainedCfg`` (typed records in place of dicts):

- a :class:`Technique` is one function of :mod:`cnnlab.viz`'s calling shape (grad-cam, saliency,
  deconv …): the parameters of the shape it uses (as the function itself declares them with
  :func:`cnnlab.viz.shape.uses`), whether its maps are signed, whether it optimises pixels, and the
  coarser options the checks, the report and the explorer run it with;
- a :class:`Method` is what ``cnnlab visualize METHOD``, the report and the explorer show: the
  :class:`Choices` it takes (the others are refused by name), the techniques ``kind`` picks among, how
  many test images it looks at by default, its quick settings for the report, and the result type it
  returns (:mod:`cnnlab.inspect.results`), which each front-end draws its own way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from cnnlab.core.errors import UserError
from cnnlab.inspect import results
from cnnlab.viz.attribute import (
    guided_backprop,
    guided_grad_cam,
    integrated_gradients,
    occlusion,
    saliency,
    smoothgrad,
)
from cnnlab.viz.cam import grad_cam, grad_cam_pp, layer_cam, score_cam
from cnnlab.viz.deconv import deconv
from cnnlab.viz.dream import dream
from cnnlab.viz.features import feature_maps
from cnnlab.viz.invert import invert
from cnnlab.viz.maximize import maximize
from cnnlab.viz.sanity import Explainer, Sanity

__all__ = ["EXPLAINERS", "METHODS", "TECHNIQUES", "Choices", "Method", "Technique", "explainers"]


@dataclass(frozen=True)
class Technique:
    """One function of the calling shape ``f(model, x, *, target, layer, channels, **options)``."""

    name: str
    function: Callable[..., Tensor]
    signed: bool = False  # the sign of a map says for or against the class
    cam: bool = False  # one map (B, 1, H, W) per image, rather than one per colour channel
    pixels: bool = False  # optimises an image in [0, 1]: takes the run's preprocessing as `preprocess`
    options: Mapping[str, Any] = field(default_factory=dict)  # coarser than the defaults: minutes on a CPU

    @property
    def uses(self) -> frozenset[str]:
        """The parameters of the shape it uses (``target``, ``layer``, ``channels``)."""
        return self.function.uses  # type: ignore[attr-defined]

    @property
    def modes(self) -> tuple[frozenset[str], ...]:
        """The ways it can be called, where they exclude each other (``maximize``: a class, or channels)."""
        return self.function.modes  # type: ignore[attr-defined]

    @property
    def explainer(self) -> Explainer:
        """It as the explanation checks run it: with its quick options, its maps one importance per pixel."""
        return Explainer(self.function, dict(self.options), self.signed, self.cam)


def _techniques(*records: Technique) -> dict[str, Technique]:
    return {t.name: t for t in records}


CAMS = _techniques(Technique("grad-cam", grad_cam, cam=True), Technique("grad-cam++", grad_cam_pp, cam=True),
                   Technique("score-cam", score_cam, cam=True), Technique("layer-cam", layer_cam, cam=True))
ATTRIBUTIONS = _techniques(
    Technique("saliency", saliency),
    Technique("guided-backprop", guided_backprop),
    Technique("guided-grad-cam", guided_grad_cam),
    Technique("integrated-gradients", integrated_gradients, signed=True,
              options=dict(steps=16, max_steps=64, tolerance=0.05)),
    Technique("smoothgrad", smoothgrad, options=dict(samples=10)),
    Technique("occlusion", occlusion, signed=True),
)
EXPLAINERS = {**CAMS, **ATTRIBUTIONS}  # what the explanation checks judge
TECHNIQUES = {**EXPLAINERS, **_techniques(
    Technique("features", feature_maps),
    Technique("deconv", deconv),
    Technique("invert", invert, pixels=True),
    Technique("dream", dream, pixels=True),
    Technique("maximize", maximize, pixels=True),
)}


def explainers(names: Sequence[str] | None = None) -> dict[str, Explainer]:
    """The explainers of the CAMs and attributions named (default: all), as the checks run them."""
    return {n: EXPLAINERS[n].explainer for n in names or EXPLAINERS}


@dataclass(frozen=True)
class Choices:
    """What the user asks a method for; an empty or ``None`` field leaves the method its default.

    The fields are the parameters of :func:`cnnlab.visualize.visualize` (and the flags of ``cnnlab
    visualize``): ``image`` files, ``index`` test images, ``count``, ``layer`` names, ``target`` classes
    (names or indices), ``channel`` indices, ``kind`` (members of a family), ``steps``.
    """

    image: tuple[str, ...] = ()
    index: tuple[int, ...] = ()
    count: int | None = None
    layer: tuple[str, ...] = ()
    target: tuple[str | int, ...] = ()
    channel: tuple[int, ...] = ()
    kind: tuple[str, ...] = ()
    steps: int | None = None

    @classmethod
    def of(cls, **given: Any) -> Choices:
        """Choices from the Python API's keywords: one value or a sequence of them each; ``None``: not given."""
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown choice {unknown[0]!r}; the choices are {', '.join(f.name for f in fields(cls))}")
        kinds = {"image": str, "index": int, "layer": str, "channel": int, "kind": str}
        values: dict[str, Any] = {}
        for name, value in given.items():
            if value is None:
                continue
            if name in ("count", "steps"):
                values[name] = int(value)
                continue
            listed = list(value) if isinstance(value, (list, tuple)) else [value]
            convert = kinds.get(name, lambda v: v)
            values[name] = tuple(convert(v) for v in listed)
        return cls(**values)

    def given(self) -> list[str]:
        """The names of the choices made, in the order of the fields."""
        return [f.name for f in fields(self) if getattr(self, f.name) not in ((), None)]


IMAGES = frozenset({"image", "index", "count"})


@dataclass(frozen=True)
class Method:
    """What a front-end shows: ``cnnlab visualize NAME``, a section of the report, a panel of the explorer."""

    name: str
    uses: frozenset[str]  # fields of Choices it takes; the others are refused by name
    result: type  # what the inspector returns for it, one per figure (see cnnlab.inspect.results)
    kinds: Mapping[str, Technique] = field(default_factory=dict)  # what `kind` picks among (default: all)
    images: int = 0  # test images looked at when none are named
    spread: bool = False  # … spread over the test set (else its first ones)
    quick: Mapping[str, Any] = field(default_factory=dict)  # the report's smaller settings

    def check(self, choices: Choices) -> None:
        """Refuse, by name, a choice the method does not use, and a bad value of one it uses."""
        unused = [name for name in choices.given() if name not in self.uses]
        if unused:
            order = [f.name for f in fields(Choices)]
            taken = ", ".join(f"`{p}`" for p in sorted(self.uses, key=order.index))
            raise UserError(f"{self.name} does not use `{unused[0]}`; it uses {taken}")
        if choices.image and choices.index:
            raise UserError("give either `image` or `index`, not both")
        for name, value, least in (("count", choices.count, 1), ("steps", choices.steps, 0)):
            if value is not None and value < least:
                raise UserError(f"`{name}` must be at least {least} (got {value})")
        self.pick(choices.kind)

    def pick(self, kinds: Sequence[str]) -> list[str]:
        """The techniques ``kinds`` name (default: all of the family), or a ``UserError`` naming a stranger."""
        for kind in kinds:
            if kind not in self.kinds:
                raise UserError(f"unknown `kind` {kind!r} for {self.name}; choose one of: {', '.join(self.kinds)}")
        return list(kinds or self.kinds)


_IMAGE_METHOD = dict(images=1)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("filters", frozenset({"layer", "channel", "count"}), results.Filters),
    Method("features", IMAGES | {"layer"}, results.FeatureMaps, **_IMAGE_METHOD),
    Method("top-images", frozenset({"layer", "channel", "count"}), results.Excitations),
    Method("deconv", IMAGES | {"layer", "channel"}, results.Projections, **_IMAGE_METHOD),
    Method("invert", IMAGES | {"layer", "steps"}, results.Inversions, **_IMAGE_METHOD),
    Method("maximize", frozenset({"layer", "channel", "target", "count", "steps"}), results.Maximisation),
    Method("dream", IMAGES | {"layer", "steps"}, results.Dreams, **_IMAGE_METHOD),
    # count: how many test images, spread over the test set (default all, up to 10,000).
    Method("embedding", frozenset({"count"}), results.Embedding),
    Method("cam", IMAGES | {"layer", "target", "kind"}, results.Explanations, CAMS, images=4,
           quick=dict(kind=("grad-cam",), count=4)),
    Method("attribute", IMAGES | {"layer", "target", "kind", "steps"}, results.Explanations, ATTRIBUTIONS,
           images=4),
    # The report's checks are kept small (the command runs 8 images and every layer): 4 images, the cascade
    # measured at conv5_x (fc … conv5_x; the whole network is always added), fewer deletion steps and
    # ROAD fractions, occlusion's windows without overlap.
    Method("sanity", IMAGES | {"layer", "kind"}, Sanity, EXPLAINERS, images=8, spread=True,
           quick=dict(count=4, layer=("conv5_x",), deletion_steps=8, road_fractions=(0.2, 0.5, 0.8))),
)}
