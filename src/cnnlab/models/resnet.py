"""ResNets and their plain counterparts, after He et al. 2015.

K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385).

- Table 1, every column: ResNet-18/34 (basic blocks, [3×3; 3×3]) and ResNet-50/101/152
  (bottlenecks, [1×1; 3×3; 1×1] with 4× expansion), for 224 px inputs: a 7×7/2 convolution, a 3×3/2
  max pool, four stages (conv2_x … conv5_x), global average pool and a fully connected classifier.
  Projection shortcuts where the shape changes (option B, Sec. 3.3).
- Fig. 3 and 4: the plain 18- and 34-layer nets, the same layers without any shortcut.
- Sec. 4.2: the CIFAR-10 nets of 6n+2 layers — a 3×3 convolution, three stages of n basic blocks
  with 16, 32 and 64 filters at 32, 16 and 8 px, global average pool, fc — with the identity
  shortcuts of option A (subsampled, zero-padded channels), so that they have exactly as many
  parameters as their plain counterparts (Table 6: 0.27 M for ResNet-20 … 1.7 M for ResNet-110).
- The assignment's two ResNet-18 variants: ``resnet18-seed`` (max pool after the first stage) and
  ``resnet18-cifar`` (3×3/1 stem without a pool, for 32 px).

Module names are part of the public interface: ``conv1``, ``maxpool``, ``layer1`` … ``layer4``,
``avgpool``, ``fc``, and inside each block ``left``, ``shortcut`` and ``relu``, so that a layer can
be named by path (``layer4.1.left.3``). Every ReLU is a separate, non-inplace ``nn.ReLU`` module,
called once per forward: attribution methods hook ReLUs one by one.

As in the paper (and its Caffe models), a bottleneck downsamples in its first 1×1 convolution;
torchvision's "ResNet v1.5" moves the stride to the 3×3, which costs about 6% more
multiply-accumulates (4.1 G instead of Table 1's 3.8 G for ResNet-50) for slightly better accuracy.
The parameters are the same either way.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BasicBlock", "Bottleneck", "CifarResNet", "ResNet", "ShortcutA",
    "plain18", "plain20", "plain32", "plain34", "plain44", "plain56",
    "resnet18", "resnet18_cifar", "resnet18_seed", "resnet20", "resnet32", "resnet34", "resnet44",
    "resnet50", "resnet56", "resnet101", "resnet110", "resnet152",
]

Stem = Literal["imagenet", "cifar"]
# "A": identity, subsampled and zero-padded where the shape changes; "B": a 1×1 projection (with batch norm)
# where the shape changes, else the identity; None: no shortcut (a plain net).
Shortcut = Literal["A", "B"] | None


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3×3 convolution with padding 1; no bias because batch norm follows."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1×1 convolution: the bottleneck's reduce and expand layers and the projection shortcut."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class ShortcutA(nn.Module):
    """Option A of He et al. 2015, Sec. 3.3: the identity, subsampled by ``stride`` and with the extra
    channels zero-padded. It has no parameters, which is what makes Table 6's ResNets as small as
    their plain nets."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        # Padding the channel dimension (the third from the end): half before, half after, as the usual
        # CIFAR implementations do.
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def _shortcut(kind: Shortcut, in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    if kind is None:
        return None
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "A":
        return ShortcutA(in_channels, out_channels, stride)
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """The two-layer block of ResNet-18/34 and of the CIFAR nets (He et al. 2015, Fig. 2 and 5 left).

    ``left`` is conv3×3(stride)–BN–ReLU–conv3×3–BN; ``shortcut`` (see :data:`Shortcut`) is added to
    it and the sum goes through the block's own ``relu``. Without a shortcut the block is a plain one.
    """

    expansion: ClassVar[int] = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: Shortcut = "B") -> None:
        super().__init__()
        self.left = nn.Sequential(
            conv3x3(in_channels, channels, stride),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            conv3x3(channels, channels),
            nn.BatchNorm2d(channels),
        )
        self.shortcut = _shortcut(shortcut, in_channels, channels, stride)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.left(x)
        return self.relu(out if self.shortcut is None else out + self.shortcut(x))


class Bottleneck(nn.Module):
    """The three-layer block of ResNet-50/101/152 (He et al. 2015, Fig. 5 right).

    ``left`` is conv1×1(stride)–BN–ReLU–conv3×3–BN–ReLU–conv1×1–BN, the last expanding to 4× the
    block's ``channels``; the stride sits on the first 1×1 as in the paper.
    """

    expansion: ClassVar[int] = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: Shortcut = "B") -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.left = nn.Sequential(
            conv1x1(in_channels, channels, stride),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            conv3x3(channels, channels),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            conv1x1(channels, out_channels),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = _shortcut(shortcut, in_channels, out_channels, stride)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.left(x)
        return self.relu(out if self.shortcut is None else out + self.shortcut(x))


Block = type[BasicBlock] | type[Bottleneck]


def _init(model: nn.Module) -> None:
    # Same initialisation as torchvision, so runs are comparable with its ResNets.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _stage(block: Block, in_channels: int, channels: int, n_blocks: int, stride: int,
           shortcut: Shortcut) -> nn.Sequential:
    # Only the first block of a stage changes resolution and width (Table 1, "conv3_1" etc.).
    layers = [block(in_channels, channels, stride, shortcut)]
    layers += [block(channels * block.expansion, channels, 1, shortcut) for _ in range(n_blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """The ImageNet ResNets of Table 1 of He et al. 2015 (and their plain nets).

    Args:
        blocks: number of blocks in each of the four stages (``(2, 2, 2, 2)`` is ResNet-18).
        num_classes: outputs of ``fc``.
        width: channels of the first stage's blocks; the later stages use 2×, 4× and 8× this
            (64 in the paper; smaller values give CPU-sized models of the same shape).
        in_channels: channels of the input image.
        stem: ``"imagenet"`` is the paper's 7×7/2 convolution followed by a 3×3/2 max pool;
            ``"cifar"`` is a 3×3/1 convolution and no pool, which keeps 32 px inputs at
            32×32 through the first stage.
        pool_after_layer1: run the max pool after ``layer1`` instead of before it. Table 1 puts
            the pool at the start of conv2_x; some course code applies it after the first
            stage, which makes conv2_x run at twice the resolution and cost about 1.8× the MACs.
        block: :class:`BasicBlock` (18, 34 layers) or :class:`Bottleneck` (50, 101, 152).
        shortcut: ``"B"`` (projection where the shape changes, the paper's default) or ``None``
            for the plain nets of Fig. 3.
    """

    # Row names of Table 1 → module paths. The max pool belongs to conv2_x, wherever it runs.
    stage_paths: ClassVar[dict[str, str]] = {
        "conv1": "conv1", "conv2_x": "layer1", "conv3_x": "layer2", "conv4_x": "layer3", "conv5_x": "layer4",
        "pool": "avgpool", "fc": "fc",
    }

    def __init__(
        self,
        blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        width: int = 64,
        in_channels: int = 3,
        stem: Stem = "imagenet",
        pool_after_layer1: bool = False,
        block: Block = BasicBlock,
        shortcut: Shortcut = "B",
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
        self.shortcut = shortcut

        if stem == "imagenet":
            stem_conv = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            stem_conv = conv3x3(in_channels, width)
        self.conv1 = nn.Sequential(stem_conv, nn.BatchNorm2d(width), nn.ReLU())
        # Registered after conv1 and before layer1: Table 1 lists the pool under conv2_x.
        self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" \
            else nn.Identity()

        e = block.expansion
        self.layer1 = _stage(block, width, width, blocks[0], 1, shortcut)
        self.layer2 = _stage(block, width * e, 2 * width, blocks[1], 2, shortcut)
        self.layer3 = _stage(block, 2 * width * e, 4 * width, blocks[2], 2, shortcut)
        self.layer4 = _stage(block, 4 * width * e, 8 * width, blocks[3], 2, shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width * e, num_classes)
        _init(self)

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


class CifarResNet(nn.Module):
    """The CIFAR-10 nets of He et al. 2015, Sec. 4.2: 6n+2 weighted layers.

    ``conv1`` is a 3×3 convolution with ``width`` filters (16 in the paper); ``layer1`` … ``layer3``
    hold n basic blocks each, with ``width``, 2× and 4× filters on 32, 16 and 8 px maps; then global
    average pooling and ``fc``. ``shortcut="A"`` gives the paper's ResNets, ``None`` its plain nets.
    The stages are named as Table 1 names the ImageNet ones: conv1, conv2_x (32×32), conv3_x (16×16),
    conv4_x (8×8).
    """

    stage_paths: ClassVar[dict[str, str]] = {
        "conv1": "conv1", "conv2_x": "layer1", "conv3_x": "layer2", "conv4_x": "layer3", "pool": "avgpool", "fc": "fc",
    }

    def __init__(self, n: int, num_classes: int = 10, width: int = 16, in_channels: int = 3,
                 shortcut: Shortcut = "A") -> None:
        super().__init__()
        self.n = n
        self.width = width
        self.shortcut = shortcut
        self.conv1 = nn.Sequential(conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = _stage(BasicBlock, width, width, n, 1, shortcut)
        self.layer2 = _stage(BasicBlock, width, 2 * width, n, 2, shortcut)
        self.layer3 = _stage(BasicBlock, 2 * width, 4 * width, n, 2, shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# Table 1, the five columns.

def resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-18 exactly as Table 1 of He et al. 2015 (18-layer column), for 224 px inputs.

    At width 64 the parameter count equals ``torchvision.models.resnet18(num_classes=...)``.
    """
    return ResNet((2, 2, 2, 2), num_classes, width, in_channels)


def resnet34(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-34, Table 1's 34-layer column (3.6 G multiply-adds at 224 px)."""
    return ResNet((3, 4, 6, 3), num_classes, width, in_channels)


def resnet50(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-50, Table 1's 50-layer column: bottleneck blocks (3.8 G multiply-adds at 224 px)."""
    return ResNet((3, 4, 6, 3), num_classes, width, in_channels, block=Bottleneck)


def resnet101(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-101, Table 1's 101-layer column (7.6 G multiply-adds at 224 px)."""
    return ResNet((3, 4, 23, 3), num_classes, width, in_channels, block=Bottleneck)


def resnet152(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-152, Table 1's 152-layer column (11.3 G multiply-adds at 224 px)."""
    return ResNet((3, 8, 36, 3), num_classes, width, in_channels, block=Bottleneck)


def plain18(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """The plain 18-layer net of He et al. 2015, Fig. 4 (left): ResNet-18 without shortcuts."""
    return ResNet((2, 2, 2, 2), num_classes, width, in_channels, shortcut=None)


def plain34(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """The plain 34-layer net of He et al. 2015, Fig. 3 (middle) and Fig. 4 (left)."""
    return ResNet((3, 4, 6, 3), num_classes, width, in_channels, shortcut=None)


# The assignment's variants of ResNet-18.

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


# Sec. 4.2 and Table 6: the CIFAR-10 nets, 6n+2 layers.

def _cifar(n: int, shortcut: Shortcut):
    def factory(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(n, num_classes, width, in_channels, shortcut)

    kind = "ResNet" if shortcut else "plain net"
    factory.__doc__ = (f"The {6 * n + 2}-layer CIFAR-10 {kind} of He et al. 2015, Sec. 4.2 (n = {n}"
                       + (", option A shortcuts)." if shortcut else ", no shortcuts)."))
    factory.__name__ = f"{'resnet' if shortcut else 'plain'}{6 * n + 2}"
    return factory


resnet20 = _cifar(3, "A")
resnet32 = _cifar(5, "A")
resnet44 = _cifar(7, "A")
resnet56 = _cifar(9, "A")
resnet110 = _cifar(18, "A")
plain20 = _cifar(3, None)
plain32 = _cifar(5, None)
plain44 = _cifar(7, None)
plain56 = _cifar(9, None)
