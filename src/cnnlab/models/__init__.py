"""The ResNet-18 variants and the registry that builds them by name."""

from __future__ import annotations

from typing import Callable

from torch import nn

from cnnlab.core.errors import UserError
from cnnlab.models.resnet import BasicBlock, ResNet, resnet18, resnet18_cifar, resnet18_seed

__all__ = [
    "BasicBlock",
    "MODELS",
    "NATIVE_IMAGE_SIZE",
    "ResNet",
    "TABLE1_LAYERS",
    "build",
    "resnet18",
    "resnet18_cifar",
    "resnet18_seed",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet18-seed": resnet18_seed,
    "resnet18-cifar": resnet18_cifar,
}

# Row names of Table 1 (He et al. 2015) -> module names. In resnet18-seed the max pool runs
# after layer1 but still belongs to conv2_x; the pool row is the global average pool.
TABLE1_LAYERS: dict[str, str] = {
    "conv1": "conv1",
    "conv2_x": "layer1",
    "conv3_x": "layer2",
    "conv4_x": "layer3",
    "conv5_x": "layer4",
    "pool": "avgpool",
    "fc": "fc",
}

NATIVE_IMAGE_SIZE: dict[str, int] = {"resnet18": 224, "resnet18-seed": 224, "resnet18-cifar": 32}


def _positive_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return value


def build(name: str, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> nn.Module:
    """Build the model registered as ``name`` with freshly initialised weights."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](
        num_classes=_positive_int("num_classes", num_classes),
        width=_positive_int("width", width),
        in_channels=_positive_int("in_channels", in_channels),
    )
