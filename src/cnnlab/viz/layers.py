"""Layers by name, and the activations they produce.

A layer is named either by its stage (He et al. 2015, Table 1: ``conv1``, ``conv2_x`` … ``conv5_x``,
``pool``, ``fc`` for the ResNets; ``conv1`` … ``conv5`` for AlexNet and VGG; see
:func:`cnnlab.models.stage_paths`) or by its module path (``layer4.1.left.3``, ``features.12``), so every
method here works on any ``nn.Module`` whose submodules have names. The defaults are found from the model
itself (:func:`default_layer`), not assumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from cnnlab.core.errors import UserError
from cnnlab.models import feature_blocks, first_conv_path, has_submodule, layer_name, stage_paths

__all__ = ["STAGES", "capture", "default_layer", "feature_layers", "first_conv", "first_layer", "forward_until",
           "layer_path", "module_at", "recording", "require_channel", "require_feature_maps", "valid_names"]

STAGES = ("conv1", "conv2_x", "conv3_x", "conv4_x", "conv5_x")  # Table 1's rows that output feature maps
_NOT_MAPS = ("pool", "fc")  # the stages that do not


def valid_names(model: nn.Module) -> list[str]:
    """The stage names this model has (its module paths are accepted too)."""
    return list(stage_paths(model))


def layer_path(model: nn.Module, name: str) -> str:
    """The module path of ``name``: a stage name or a module path of ``model``."""
    path = stage_paths(model).get(name, name)
    if path and has_submodule(model, path):
        return path
    tops = [n for n, _ in model.named_children()]
    example = next((p for p, m in model.named_modules() if p.count(".") >= 2), tops[-1] if tops else "")
    stages = ", ".join(valid_names(model))
    raise UserError(f"unknown layer {name!r}; choose " + (f"a stage ({stages}) or " if stages else "")
                    + f"a module path such as {example} (top level: {', '.join(tops)})")


def module_at(model: nn.Module, name: str) -> nn.Module:
    """The module named ``name`` (see :func:`layer_path`)."""
    return model.get_submodule(layer_path(model, name))


_FOUND: WeakKeyDictionary[nn.Module, dict[tuple[int, ...], object]] = WeakKeyDictionary()


def _blocks(model: nn.Module, x: Tensor | None):
    """:func:`cnnlab.models.feature_blocks` for inputs like ``x`` (default: one 64 px image, or 224 px for
    models that take only that), remembered per model and input shape."""
    param = next(model.parameters(), None)
    if x is None:
        conv = first_conv_path(model)
        channels = model.get_submodule(conv).in_channels if conv else 3
        probes = [torch.zeros(1, channels, s, s, device=param.device if param is not None else "cpu",
                              dtype=param.dtype if param is not None else torch.float32) for s in (64, 224)]
    else:
        probes = [x[:1].detach()]
    known = _FOUND.setdefault(model, {})
    key = tuple(probes[0].shape)
    if key not in known:
        for probe in probes:
            try:
                known[key] = feature_blocks(model, probe)
                break
            except (RuntimeError, ValueError, AssertionError) as e:  # an input size the model does not take
                known[key] = e
    found = known[key]
    if isinstance(found, Exception):
        raise UserError("cannot find the model's feature maps "
                        f"({str(found).splitlines()[0] if str(found) else found!r});"
                        " give `layer` as a module path")
    return found


def default_layer(model: nn.Module, x: Tensor | None = None) -> str:
    """What ``layer=None`` means: the last spatial feature block for inputs like ``x`` (conv5_x of the
    ImageNet ResNets, conv4_x of the CIFAR ones, conv5 of AlexNet and VGG, ``features`` of torchvision's
    MobileNets), found by running the model once (:func:`cnnlab.models.feature_blocks`); by stage name where
    it is a stage."""
    return layer_name(model, _blocks(model, x).last)


def first_layer(model: nn.Module) -> str:
    """The layer that reads the image: the stage ``conv1`` where there is one, else the first convolution."""
    stages = stage_paths(model)
    if "conv1" in stages:
        return "conv1"
    path = first_conv_path(model)
    if path is None:
        raise UserError("the model has no convolution; give `layer` as a module path")
    return path


def feature_layers(model: nn.Module, x: Tensor | None = None) -> list[str]:
    """The layers that show a model's feature maps from the image up: its stages (Table 1's conv1 …
    conv5_x, AlexNet's and VGG's conv1 … conv5) up to the last spatial feature block, or else the first
    convolution and the last block."""
    last = default_layer(model, x)
    stages = [name for name in valid_names(model) if name not in _NOT_MAPS]
    if last in stages:
        return stages[:stages.index(last) + 1]
    first = first_layer(model)
    return [first, last] if first != last else [last]


def first_conv(model: nn.Module, name: str) -> tuple[str, nn.Conv2d]:
    """The first ``Conv2d`` at or inside layer ``name``, with its module path: the layer's filters."""
    path = layer_path(model, name)
    for sub, module in model.get_submodule(path).named_modules():
        if isinstance(module, nn.Conv2d):
            return (f"{path}.{sub}" if sub else path), module
    convs = [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    raise UserError(f"layer {name!r} holds no convolution, so it has no filters; choose one of "
                    f"{', '.join(valid_names(model)[:-2]) or ', '.join(convs[:8])} or a conv's path ({convs[-1]})")


class _Enough(Exception):
    """Raised by a hook once every wanted layer has run, to skip the rest of the forward pass."""


@contextmanager
def recording(model: nn.Module, names: Sequence[str], detach: bool = True,
              stop: bool = False) -> Iterator[dict[str, Tensor]]:
    """While open, each forward of ``model`` stores the output of every named layer in the dict yielded.

    ``detach=False`` keeps the graph, for methods that differentiate the activation itself.
    ``stop=True`` ends a forward pass as soon as all the layers have run (call it through
    :func:`forward_until`): methods that optimise an image against an early layer need not pay for the
    layers after it.
    """
    store: dict[str, Tensor] = {}
    handles = []
    wanted = set(names)
    for name in names:
        module = module_at(model, name)

        def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor, name: str = name) -> None:
            store[name] = output.detach() if detach else output
            if stop and wanted <= store.keys():
                raise _Enough

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def forward_until(model: nn.Module, x: Tensor, store: dict[str, Tensor]) -> None:
    """Run ``model`` on ``x`` inside ``recording(…, stop=True)``; it stops once the layers are stored."""
    store.clear()
    try:
        model(x)
    except _Enough:
        pass


def capture(model: nn.Module, x: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """The outputs of the named layers for the batch ``x``, in one forward pass without gradients."""
    with recording(model, names, stop=True) as store, torch.no_grad():
        forward_until(model, x, store)
    missing = [n for n in names if n not in store]
    if missing:
        raise UserError(f"layer {missing[0]!r} does not run in the model's forward pass; "
                        f"choose one of {', '.join(valid_names(model)) or 'its module paths'}")
    return {n: store[n] for n in names}


def require_feature_maps(acts: Tensor, layer: str) -> Tensor:
    """``acts`` if it is (B, C, h, w) feature maps, else the one-line error every method gives."""
    if acts.ndim != 4:
        raise UserError(f"layer {layer!r} outputs shape {list(acts.shape[1:])}, not feature maps; choose a "
                        "convolutional layer: a stage such as conv1 … conv5_x, or a conv module path")
    return acts


def require_channel(acts: Tensor, layer: str, channels: int | Tensor, param: str = "channels") -> None:
    """Refuse channel indices that ``layer``'s output (B, C, …) does not have, naming ``param``."""
    for channel in torch.as_tensor(channels).flatten().unique().tolist():
        if not 0 <= channel < acts.shape[1]:
            raise UserError(f"`{param}` {channel} is out of range; layer {layer!r} has "
                            f"{acts.shape[1]} channels (0 … {acts.shape[1] - 1})")
