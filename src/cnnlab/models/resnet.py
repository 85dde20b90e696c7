"""ResNet-18 in three variants, after Table 1 of He et al. 2015.

K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385). Table 1, column "18-layer": a 7×7/2 convolution, a 3×3/2 max pool, four
stages of two basic blocks ([3×3; 3×3]) with 64, 128, 256 and 512 channels, global average pool
and a fully connected classifier.

Module names are part of the public interface: ``conv1``, ``maxpool``, ``layer1`` … ``layer4``,
``avgpool``, ``fc``, and inside each block ``left``, ``shortcut`` and ``relu``, so that a layer can
be named by path (``layer4.1.left.3``). Every ReLU is a separate, non-inplace ``nn.ReLU`` module:
attribution methods hook ReLUs one by one and need each to see exactly one call per forward.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet18_seed", "resnet18_cifar"]

Stem = Literal["imagenet", "cifar"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3×3 convolution with padding 1; no bias because batch norm follows."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1×1 convolution, the projection shortcut (option B of He et al. 2015, Sec. 3.3)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """The two-layer residual block of ResNet-18/34 (He et al. 2015, Fig. 2 and Table 1).

    ``left`` is conv3×3(stride)–BN–ReLU–conv3×3–BN; ``shortcut`` is a 1×1 projection with BN when
    the shape changes, else the identity. The sum goes through the block's own ``relu``.
    """

    expansion: int = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.left = nn.Sequential(
            conv3x3(in_channels, out_channels, stride),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            conv3x3(out_channels, out_channels),
            nn.BatchNorm2d(out_channels),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                conv1x1(in_channels, out_channels, stride),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.left(x) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet built from :class:`BasicBlock` stages, as in Table 1 of He et al. 2015.

    Args:
        blocks: number of blocks in each of the four stages (``(2, 2, 2, 2)`` is ResNet-18).
        num_classes: outputs of ``fc``.
        width: channels of the first stage; the later stages use 2×, 4× and 8× this
            (64 in the paper; smaller values give CPU-sized models of the same shape).
        in_channels: channels of the input image.
        stem: ``"imagenet"`` is the paper's 7×7/2 convolution followed by a 3×3/2 max pool;
            ``"cifar"`` is a 3×3/1 convolution and no pool, which keeps 32 px inputs at
            32×32 through the first stage (the CIFAR setting of He et al. 2015, Sec. 4.2).
        pool_after_layer1: run the max pool after ``layer1`` instead of before it. Table 1 puts
            the pool at the start of conv2_x; some course code applies it after the first
            stage, which makes conv2_x run at twice the resolution and cost about 1.8× the MACs.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        width: int = 64,
        in_channels: int = 3,
        stem: Stem = "imagenet",
        pool_after_layer1: bool = False,
    ) -> None:
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"ResNet has four stages, got block counts {list(blocks)}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.blocks = tuple(blocks)
        self.num_classes = num_classes
        self.width = width
        self.in_channels = in_channels
        self.stem = stem
        self.pool_after_layer1 = pool_after_layer1

        if stem == "imagenet":
            stem_conv = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            stem_conv = conv3x3(in_channels, width)
            self.maxpool = nn.Identity()
        self.conv1 = nn.Sequential(stem_conv, nn.BatchNorm2d(width), nn.ReLU())

        self.layer1 = self._make_stage(width, width, blocks[0], stride=1)
        self.layer2 = self._make_stage(width, 2 * width, blocks[1], stride=2)
        self.layer3 = self._make_stage(2 * width, 4 * width, blocks[2], stride=2)
        self.layer4 = self._make_stage(4 * width, 8 * width, blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)

        # Same initialisation as torchvision, so runs are comparable with its ResNet-18.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, n_blocks: int, stride: int) -> nn.Sequential:
        # Only the first block of a stage changes resolution and width (Table 1, "conv3_1" etc.).
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(n_blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if not self.pool_after_layer1:
            x = self.maxpool(x)
        x = self.layer1(x)
        if self.pool_after_layer1:
            x = self.maxpool(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-18 exactly as Table 1 of He et al. 2015 (18-layer column), for 224 px inputs.

    At width 64 the parameter count equals ``torchvision.models.resnet18(num_classes=...)``.
    """
    return ResNet((2, 2, 2, 2), num_classes, width, in_channels, stem="imagenet")


def resnet18_seed(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-18 as a course assignment wrote it: Table 1's layers, max pool after ``layer1``.

    Same parameters as :func:`resnet18`; only the order differs, so conv2_x runs at 112×112
    for a 224 px input (He et al. 2015, Table 1 has it at 56×56).
    """
    return ResNet((2, 2, 2, 2), num_classes, width, in_channels, stem="imagenet", pool_after_layer1=True)


def resnet18_cifar(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-18 with a 3×3/1 stem and no max pool, for 32 px images such as CIFAR-10.

    The stages are those of Table 1 of He et al. 2015; only the stem changes, so a 32 px input
    leaves ``layer4`` at 4×4 instead of 1×1.
    """
    return ResNet((2, 2, 2, 2), num_classes, width, in_channels, stem="cifar")
