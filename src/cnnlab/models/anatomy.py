"""Where things are inside a model, found from the model itself: stage names, the head, the first
convolution and the last spatial feature block.

cnnlab's own networks declare their stages (``stage_paths``: Table 1's ``conv1``, ``conv2_x`` … for
the ResNets, ``conv1`` … ``conv5`` for AlexNet and VGG); ResNet-shaped models of torchvision and timm
(``conv1`` and ``layer1`` … ``layer4``) get Table 1's names too. Everything else is found by running
the model once and watching which modules produce feature maps, so it works on any CNN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["FeatureBlocks", "feature_blocks", "first_conv_path", "has_submodule", "head_path", "is_pooling",
           "layer_name", "stage_paths"]

_RESNET_CHILDREN = ("conv1", "layer1", "layer2", "layer3", "layer4")
_RESNET_STAGES = {"conv1": "conv1", "conv2_x": "layer1", "conv3_x": "layer2", "conv4_x": "layer3",
                  "conv5_x": "layer4"}


def stage_paths(model: nn.Module) -> dict[str, str]:
    """Stage name → module path, for the stages this model has (empty when it declares none)."""
    children = dict(model.named_children())
    declared = getattr(type(model), "stage_paths", None)
    if isinstance(declared, dict):
        return {name: path for name, path in declared.items() if has_submodule(model, path)}
    if all(c in children for c in _RESNET_CHILDREN):  # torchvision's and timm's ResNets
        paths = dict(_RESNET_STAGES)
        pool = next((p for p in ("avgpool", "global_pool") if p in children), None)
        if pool:
            paths["pool"] = pool
        if "fc" in children:
            paths["fc"] = "fc"
        return paths
    return {}


def has_submodule(model: nn.Module, path: str) -> bool:
    """Whether ``model`` has a submodule at ``path``."""
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def layer_name(model: nn.Module, path: str) -> str:
    """The stage name of module ``path`` if it is a stage, else the path itself."""
    return next((name for name, p in stage_paths(model).items() if p == path), path)


def first_conv_path(model: nn.Module) -> str | None:
    """The first ``Conv2d`` in module order: the layer that reads the image."""
    return next((p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def head_path(model: nn.Module) -> str | None:
    """The module that maps features to class scores: timm's ``get_classifier()``, else the last ``Linear``
    (the last ``Conv2d`` for all-convolutional classifiers such as SqueezeNet)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        found = next((p for p, m in model.named_modules() if m is head and p), None)
        if found and any(True for _ in head.parameters()):
            return found
    for kind in (nn.Linear, nn.Conv2d):
        path = next((p for p, m in reversed(list(model.named_modules())) if isinstance(m, kind)), None)
        if path:
            return path
    return None


_REDUCERS = (nn.Identity, nn.Dropout, nn.Flatten)


def is_pooling(module: nn.Module, passive: bool = False) -> bool:
    """A parameter-free module that only pools (or passes through): a pool, or a container of pools.
    ``passive=True`` also counts modules that only pass through (identity, dropout, flatten)."""
    if any(True for _ in module.parameters()):
        return False
    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    pools = any("pool" in type(m).__name__.lower() for m in leaves)
    return (pools or passive) and all("pool" in type(m).__name__.lower() or isinstance(m, _REDUCERS) for m in leaves)


@dataclass
class FeatureBlocks:
    """What one forward pass shows about a model's feature maps."""

    paths: list[str]  # modules that output (B, C, H, W) maps before the global pool, in the order they finish
    shapes: dict[str, list[int]]  # their output shapes (C, H, W)
    last: str  # the last of them that is not a pool: the feature block CAMs look at


@torch.no_grad()
def feature_blocks(model: nn.Module, x: Tensor) -> FeatureBlocks:
    """Run ``model`` on one image of ``x`` and find its feature maps up to the global pool.

    The feature extractor ends with the last map larger than 1×1 before the head (the classifier, see
    :func:`head_path`). The last module to finish with that 4-D output, or the last before it that is not
    itself a pool, is the last spatial feature block: for a ResNet its ``layer4`` (conv5_x), for
    torchvision's MobileNets and EfficientNets their ``features``, for cnnlab's VGG its ``conv5``. An input
    so small that the last stage is 1×1 gives the last stage with larger maps.
    """
    events: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def hook(m: nn.Module, _inputs, output, path: str = path) -> None:
            if isinstance(output, Tensor):
                events.append((path, m, tuple(output.shape)))

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(x[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    head = head_path(model)
    stop = next((i for i, (path, _, _) in enumerate(events) if head and path == head), len(events))
    maps = [i for i, (_, _, shape) in enumerate(events[:stop]) if len(shape) == 4]
    # The last map larger than 1×1 ends the feature extractor; squeeze-and-excitation pools inside it
    # (1×1 maps before it) do not.
    wide = [i for i in maps if tuple(events[i][2][-2:]) != (1, 1)]
    end = (wide or maps or [-1])[-1]
    paths: list[str] = []
    shapes: dict[str, list[int]] = {}
    for path, _module, shape in events[:end + 1]:
        if len(shape) != 4:
            continue
        if path not in shapes:
            paths.append(path)
        shapes[path] = list(shape[1:])
    spatial = [p for p in paths if not is_pooling(model.get_submodule(p), passive=True)]
    if not spatial:
        raise ValueError("the model produces no feature maps")
    return FeatureBlocks(paths, shapes, spatial[-1])
