"""The networks the visualisation papers look inside: an AlexNet and VGG-11/16 with batch norm.

- A. Krizhevsky, I. Sutskever, G. E. Hinton, "ImageNet Classification with Deep Convolutional Neural
  Networks", NeurIPS 2012, in the single-tower form of A. Krizhevsky, "One weird trick for
  parallelizing convolutional neural networks", 2014 (arXiv:1404.5997), which torchvision ships and
  on which Zeiler & Fergus (ECCV 2014) and Mahendran & Vedaldi (CVPR 2015) drew their figures.
- K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
  ICLR 2015 (arXiv:1409.1556), Table 1 configurations A (VGG-11) and D (VGG-16), with batch norm
  after every convolution (Ioffe & Szegedy 2015) as torchvision's ``vgg11_bn`` and ``vgg16_bn``.

Each comes sized for 224 px (the papers' networks: at width 64 the parameter counts equal
torchvision's ``alexnet``, ``vgg11_bn`` and ``vgg16_bn``) and for 32 px (``-cifar``: the same
convolutions, a pooling head that ends at 4×4 or 1×1 and a smaller classifier).

The layers are grouped the way the papers name them: ``conv1`` … ``conv5`` (each group starts with
the max pool that feeds it, as Table 1 of He et al. 2015 puts the pool in conv2_x), ``pool`` (the last
max pool and the adaptive average pool) and ``fc`` (the classifier; its last ``Linear`` is the head).
Every ReLU is its own non-inplace module.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn

__all__ = ["AlexNet", "VGG", "alexnet", "alexnet_cifar", "vgg11", "vgg11_cifar", "vgg16", "vgg16_cifar"]

# Convolutions per group (Simonyan & Zisserman 2015, Table 1), as multiples of the width (64 in the paper).
VGG_CONFIGS: dict[str, tuple[tuple[int, int], ...]] = {
    "A": ((1, 1), (1, 2), (2, 4), (2, 8), (2, 8)),  # (convolutions, channels ÷ width) per group
    "D": ((2, 1), (2, 2), (3, 4), (3, 8), (3, 8)),
}
STAGE_PATHS = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "conv4": "conv4", "conv5": "conv5",
               "pool": "pool", "fc": "fc"}


def _classifier(features: int, hidden: int, num_classes: int, dropout_first: bool) -> nn.Sequential:
    """fc6, fc7 and fc8 with ReLU and dropout: VGG drops out after fc6 and fc7, AlexNet before them."""
    if dropout_first:
        layers = [nn.Dropout(), nn.Linear(features, hidden), nn.ReLU(),
                  nn.Dropout(), nn.Linear(hidden, hidden), nn.ReLU()]
    else:
        layers = [nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(),
                  nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout()]
    return nn.Sequential(*layers, nn.Linear(hidden, num_classes))


class VGG(nn.Module):
    """VGG with batch norm (Simonyan & Zisserman 2015).

    Args:
        config: ``"A"`` (VGG-11) or ``"D"`` (VGG-16).
        num_classes: outputs of the last layer.
        width: channels of ``conv1`` (64 in the paper); the groups use 1, 2, 4, 8 and 8× this.
        in_channels: channels of the input image.
        small: the 32 px head — global average pool after the fifth max pool and one ``Linear`` —
            instead of the paper's 7×7 pool and two 4096-unit hidden layers (64 × width units).
    """

    stage_paths: ClassVar[dict[str, str]] = STAGE_PATHS

    def __init__(self, config: str = "D", num_classes: int = 10, width: int = 64, in_channels: int = 3,
                 small: bool = False) -> None:
        super().__init__()
        self.config, self.width, self.small = config, width, small
        channels = in_channels
        for i, (convs, mult) in enumerate(VGG_CONFIGS[config], start=1):
            layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if i > 1 else []
            for _ in range(convs):
                layers += [nn.Conv2d(channels, mult * width, 3, padding=1), nn.BatchNorm2d(mult * width), nn.ReLU()]
                channels = mult * width
            self.add_module(f"conv{i}", nn.Sequential(*layers))
        side = 1 if small else 7
        self.pool = nn.Sequential(nn.MaxPool2d(2, 2), nn.AdaptiveAvgPool2d(side))
        if small:
            self.fc: nn.Module = nn.Linear(channels, num_classes)
        else:
            self.fc = _classifier(channels * side * side, 64 * width, num_classes, dropout_first=False)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, 6):
            x = getattr(self, f"conv{i}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class AlexNet(nn.Module):
    """AlexNet, single tower (Krizhevsky 2014), without local response normalisation as torchvision has it.

    Args:
        num_classes: outputs of the last layer.
        width: channels of ``conv1`` (64); the later groups use 3, 6, 4 and 4× this, the hidden fully
            connected layers 64× (4096).
        in_channels: channels of the input image.
        small: for 32 px: a 5×5/1 first convolution, 3×3/2 max pools that halve the maps exactly, a 4×4
            pooled map and hidden layers of 16 × width units.
    """

    stage_paths: ClassVar[dict[str, str]] = STAGE_PATHS

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3, small: bool = False) -> None:
        super().__init__()
        self.width, self.small = width, small
        c1, c2, c3, c4, c5 = width, 3 * width, 6 * width, 4 * width, 4 * width
        if small:
            first = nn.Conv2d(in_channels, c1, kernel_size=5, stride=1, padding=2)
            pool = partial(nn.MaxPool2d, kernel_size=3, stride=2, padding=1)
            side, hidden = 4, 16 * width
        else:
            first = nn.Conv2d(in_channels, c1, kernel_size=11, stride=4, padding=2)
            pool = partial(nn.MaxPool2d, kernel_size=3, stride=2)
            side, hidden = 6, 64 * width
        self.conv1 = nn.Sequential(first, nn.ReLU())
        self.conv2 = nn.Sequential(pool(), nn.Conv2d(c1, c2, kernel_size=5, padding=2), nn.ReLU())
        self.conv3 = nn.Sequential(pool(), nn.Conv2d(c2, c3, kernel_size=3, padding=1), nn.ReLU())
        self.conv4 = nn.Sequential(nn.Conv2d(c3, c4, kernel_size=3, padding=1), nn.ReLU())
        self.conv5 = nn.Sequential(nn.Conv2d(c4, c5, kernel_size=3, padding=1), nn.ReLU())
        self.pool = nn.Sequential(pool(), nn.AdaptiveAvgPool2d(side))
        self.fc = _classifier(c5 * side * side, hidden, num_classes, dropout_first=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv5(self.conv4(self.conv3(self.conv2(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def vgg11(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> VGG:
    """VGG-11 with batch norm for 224 px (configuration A; torchvision's ``vgg11_bn`` at width 64)."""
    return VGG("A", num_classes, width, in_channels)


def vgg16(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> VGG:
    """VGG-16 with batch norm for 224 px (configuration D; torchvision's ``vgg16_bn`` at width 64)."""
    return VGG("D", num_classes, width, in_channels)


def vgg11_cifar(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> VGG:
    """VGG-11 with batch norm for 32 px: the same convolutions, global average pool and one ``Linear``."""
    return VGG("A", num_classes, width, in_channels, small=True)


def vgg16_cifar(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> VGG:
    """VGG-16 with batch norm for 32 px: the same convolutions, global average pool and one ``Linear``."""
    return VGG("D", num_classes, width, in_channels, small=True)


def alexnet(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> AlexNet:
    """AlexNet for 224 px (torchvision's ``alexnet`` at width 64)."""
    return AlexNet(num_classes, width, in_channels)


def alexnet_cifar(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> AlexNet:
    """An AlexNet for 32 px: five convolutions and three fully connected layers, as Krizhevsky's, resized."""
    return AlexNet(num_classes, width, in_channels, small=True)

