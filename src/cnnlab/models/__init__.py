"""The models ``--model`` names, and :func:`build`, which makes any of them from a :class:`ModelSpec`'s fields.

cnnlab's own networks (the registry :data:`MODELS`): every column of Table 1 of He et al. 2015 and its
plain nets, the CIFAR-10 ResNets and plain nets of its Sec. 4.2, the assignment's ResNet-18 variants,
AlexNet and VGG-11/16 with batch norm, at 224 and 32 px, and airbench94's network (Jordan 2024). Besides
them, any torchvision classification model as ``torchvision:NAME`` and any timm model as ``timm:NAME``
(:mod:`cnnlab.models.external`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from cnnlab.core.errors import UserError
from cnnlab.models import airbench, classic, resnet
from cnnlab.models.anatomy import feature_blocks, first_conv_path, has_submodule, head_path, layer_name, stage_paths
from cnnlab.models.external import TIMM, TORCHVISION, build_external, check_external, is_external
from cnnlab.models.resnet import BasicBlock, Bottleneck, CifarResNet, ResNet, resnet18, resnet18_cifar, resnet18_seed

__all__ = [
    "BasicBlock", "Bottleneck", "CifarResNet", "FAMILIES", "MODELS", "ModelInfo", "NATIVE_IMAGE_SIZE", "ResNet",
    "TABLE1_LAYERS", "build", "check_name", "default_width", "feature_blocks", "first_conv_path", "has_submodule",
    "head_path", "is_external", "layer_name", "native_image_size", "resnet18", "resnet18_cifar", "resnet18_seed",
    "stage_paths",
]


@dataclass(frozen=True)
class ModelInfo:
    """One of cnnlab's own networks."""

    factory: Callable[..., nn.Module]  # (num_classes, width, in_channels) → model
    family: str
    image_size: int  # the input size it is made for
    width: int  # the paper's base width (channels of the first stage)
    about: str

    def __call__(self, num_classes: int = 10, width: int | None = None, in_channels: int = 3) -> nn.Module:
        return self.factory(num_classes=num_classes, width=self.width if width is None else width,
                            in_channels=in_channels)


_T1 = "He et al. 2015, Table 1"
_CIFAR = "He et al. 2015, Sec. 4.2"
MODELS: dict[str, ModelInfo] = {
    "resnet18": ModelInfo(resnet.resnet18, "resnet", 224, 64, f"{_T1}, 18 layers (basic blocks)"),
    "resnet34": ModelInfo(resnet.resnet34, "resnet", 224, 64, f"{_T1}, 34 layers (basic blocks)"),
    "resnet50": ModelInfo(resnet.resnet50, "resnet", 224, 64, f"{_T1}, 50 layers (bottlenecks)"),
    "resnet101": ModelInfo(resnet.resnet101, "resnet", 224, 64, f"{_T1}, 101 layers (bottlenecks)"),
    "resnet152": ModelInfo(resnet.resnet152, "resnet", 224, 64, f"{_T1}, 152 layers (bottlenecks)"),
    "plain18": ModelInfo(resnet.plain18, "plain", 224, 64, "He et al. 2015, Fig. 4: ResNet-18 without shortcuts"),
    "plain34": ModelInfo(resnet.plain34, "plain", 224, 64, "He et al. 2015, Fig. 4: ResNet-34 without shortcuts"),
    "resnet18-seed": ModelInfo(resnet.resnet18_seed, "resnet", 224, 64,
                               "the assignment's code: ResNet-18 with the max pool after layer1"),
    "resnet18-cifar": ModelInfo(resnet.resnet18_cifar, "resnet", 32, 64, "ResNet-18 with a 3×3/1 stem, no max pool"),
    **{f"resnet{6 * n + 2}": ModelInfo(getattr(resnet, f"resnet{6 * n + 2}"), "cifar-resnet", 32, 16,
                                       f"{_CIFAR}: {6 * n + 2} layers, option-A shortcuts")
       for n in (3, 5, 7, 9, 18)},
    **{f"plain{6 * n + 2}": ModelInfo(getattr(resnet, f"plain{6 * n + 2}"), "cifar-plain", 32, 16,
                                      f"{_CIFAR}: {6 * n + 2} layers, no shortcuts")
       for n in (3, 5, 7, 9)},
    "alexnet": ModelInfo(classic.alexnet, "alexnet", 224, 64, "Krizhevsky 2012/2014, single tower (torchvision's)"),
    "alexnet-cifar": ModelInfo(classic.alexnet_cifar, "alexnet", 32, 64, "an AlexNet for 32 px"),
    "vgg11": ModelInfo(classic.vgg11, "vgg", 224, 64, "Simonyan & Zisserman 2015, config A, batch norm"),
    "vgg16": ModelInfo(classic.vgg16, "vgg", 224, 64, "Simonyan & Zisserman 2015, config D, batch norm"),
    "vgg11-cifar": ModelInfo(classic.vgg11_cifar, "vgg", 32, 64, "VGG-11 (batch norm) for 32 px"),
    "vgg16-cifar": ModelInfo(classic.vgg16_cifar, "vgg", 32, 64, "VGG-16 (batch norm) for 32 px"),
    "airbench94": ModelInfo(airbench.airbench94, "airbench", 32, 64,
                            "Jordan 2024: whitening 2x2 conv, three conv groups, --recipe airbench"),
}

FAMILIES: dict[str, str] = {
    "resnet": "ResNets of Table 1 (He et al. 2015) and the assignment's ResNet-18 variants",
    "plain": "the plain nets of He et al. 2015, Fig. 4",
    "cifar-resnet": "the CIFAR-10 ResNets of He et al. 2015, Sec. 4.2 (Table 6)",
    "cifar-plain": "the CIFAR-10 plain nets of He et al. 2015, Sec. 4.2 (Fig. 6)",
    "alexnet": "AlexNet (Krizhevsky et al. 2012)",
    "vgg": "VGG with batch norm (Simonyan & Zisserman 2015)",
    "airbench": "airbench94's network (Jordan 2024, \"94% on CIFAR-10 in 3.29 seconds\")",
    "torchvision": "any torchvision classification model: torchvision:NAME",
    "timm": "any timm model (pip install 'cnnlab[timm]'): timm:NAME",
}

# Table 1's rows → module paths of cnnlab's ImageNet ResNets.
TABLE1_LAYERS: dict[str, str] = dict(ResNet.stage_paths)

NATIVE_IMAGE_SIZE: dict[str, int] = {name: info.image_size for name, info in MODELS.items()}


def check_name(name: str) -> None:
    """Refuse a name ``--model`` does not know, in one line."""
    if not isinstance(name, str):
        raise UserError(f"`model` must be text, got {name!r}")
    if is_external(name):
        check_external(name)
    elif name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, {TORCHVISION}NAME or {TIMM}NAME")


def default_width(name: str) -> int | None:
    """The paper's width of a cnnlab model; None for torchvision and timm models, which have their own."""
    check_name(name)
    return None if is_external(name) else MODELS[name].width


def native_image_size(name: str) -> int:
    """The input size a model is made for (224 for torchvision and timm models, or their weights' own)."""
    check_name(name)
    if name in MODELS:
        return MODELS[name].image_size
    if name.startswith(TIMM):
        import timm

        cfg = timm.models.get_pretrained_cfg(name[len(TIMM):])
        if cfg is not None and cfg.input_size:
            return int(cfg.input_size[-1])
    return 224


def _positive_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return value


def build(name: str, num_classes: int = 10, width: int | None = None, in_channels: int = 3) -> nn.Module:
    """Build the model ``name`` with freshly initialised weights.

    ``width`` scales cnnlab's own networks (None: the paper's); torchvision and timm models have their
    own widths, so for them it must be None.
    """
    check_name(name)
    num_classes = _positive_int("num_classes", num_classes)
    in_channels = _positive_int("in_channels", in_channels)
    if is_external(name):
        if width is not None:
            raise UserError(f"`width` scales cnnlab's own models; {name} has its own widths (leave `width` out)")
        return build_external(name, num_classes, in_channels)
    return MODELS[name](num_classes=num_classes, width=_positive_int("width", width) if width is not None else None,
                        in_channels=in_channels)
