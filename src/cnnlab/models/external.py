"""Any classification model of torchvision (``torchvision:NAME``) or timm (``timm:NAME``), built by their
own constructors with the head sized for the dataset's classes and the stem for its channels.

torchvision builds with ``torchvision.models.get_model(NAME, weights=None, num_classes=…)``; a
one-channel (or any non-RGB) input gets the first convolution rebuilt for that many channels.
timm builds with ``timm.create_model(NAME, num_classes=…, in_chans=…)``, which adapts the stem itself.
timm is optional: ``pip install 'cnnlab[timm]'``.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

from torch import nn

from cnnlab.core.errors import UserError
from cnnlab.models.anatomy import first_conv_path

__all__ = ["TIMM", "TORCHVISION", "build_external", "check_external", "is_external", "source_and_arch",
           "timm_available", "timm_names", "torchvision_names"]

TORCHVISION = "torchvision:"
TIMM = "timm:"

# Constructors whose defaults would make training return something other than logits.
_TORCHVISION_OPTIONS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def is_external(name: str) -> bool:
    return name.startswith((TORCHVISION, TIMM))


def source_and_arch(name: str) -> tuple[str, str]:
    """``("torchvision" | "timm", NAME)`` for an external model name."""
    source, _, arch = name.partition(":")
    return source, arch


@lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    """torchvision's classification models (not its detection, segmentation, video or quantized ones)."""
    import torchvision.models

    return tuple(torchvision.models.list_models(module=torchvision.models))


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


@lru_cache(maxsize=1)
def timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def _require_timm(name: str) -> None:
    if not timm_available():
        raise UserError(f"model {name!r} needs timm, which is not installed: pip install 'cnnlab[timm]'")


def check_external(name: str) -> None:
    """Refuse an unknown ``torchvision:``/``timm:`` name (or timm missing) in one line."""
    source, arch = source_and_arch(name)
    if source == "torchvision":
        names = torchvision_names()
        if arch not in names:
            near = [n for n in names if arch and (arch in n or n in arch)][:6]
            hint = f"; did you mean {', '.join(TORCHVISION + n for n in near)}?" if near else \
                "; `cnnlab models --all` lists them"
            raise UserError(f"torchvision has no classification model {arch!r}{hint}")
        return
    _require_timm(name)
    import timm

    if not arch or not timm.is_model(arch.split(".")[0]):
        near = timm.list_models(f"*{arch.split('.')[0]}*")[:6] if arch else []
        hint = f"; did you mean {', '.join(TIMM + n for n in near)}?" if near else "; `cnnlab models --all` lists them"
        raise UserError(f"timm has no model {arch!r}{hint}")


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    path = first_conv_path(model)
    if path is None:
        raise UserError("the model has no convolution to read a non-RGB image with")
    old = model.get_submodule(path)
    assert isinstance(old, nn.Conv2d)
    if old.in_channels == in_channels:
        return
    if old.groups != 1:
        raise UserError(f"the model's first convolution ({path}) is grouped; it cannot be rebuilt for "
                        f"{in_channels}-channel images")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=old.bias is not None, padding_mode=old.padding_mode)
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def build_external(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialised ``torchvision:NAME`` or ``timm:NAME`` with ``num_classes`` outputs."""
    check_external(name)
    source, arch = source_and_arch(name)
    if source == "torchvision":
        import torchvision.models

        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes,
                                             **_TORCHVISION_OPTIONS.get(arch, {}))
        if in_channels != 3:
            _adapt_input_channels(model, in_channels)
        return model
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)
