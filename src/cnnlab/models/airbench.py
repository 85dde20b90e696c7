"""airbench94's network: K. Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU", 2024
(arXiv:2404.00498; github.com/KellerJordan/cifar10-airbench, ``airbench94.py``).

A 2×2 convolution without padding that the training recipe initialises to whiten the image's 2×2 patches
(2·3·2·2 = 24 channels: each whitening filter and its negative, with a bias) and a GELU; three groups
of widths 64, 256 and 256, each conv 3×3 → max pool 2 → BatchNorm → GELU → conv 3×3 → BatchNorm → GELU;
a 3×3 max pool; a linear layer 256 → 10 without bias; the logits scaled by 1/9. Its BatchNorms have no
learned scale (their weight stays 1, as airbench's ``weight=False``), a momentum of 0.6 in airbench's
convention (the weight of the old running statistics), which is PyTorch's ``momentum`` 0.4, and eps 1e-12.

The initialisations that airbench's code makes part of the network (the whitening filters, identity
convolutions) are the training recipe's here (``whiten``, ``dirac_init`` of :mod:`cnnlab.config`), so
that they can be tried on other models; built alone, the convolutions start as PyTorch's.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

__all__ = ["AirbenchNet", "airbench94", "NORM_EPS", "NORM_MOMENTUM"]

NORM_MOMENTUM = 1 - 0.6  # airbench's 0.6 weighs the old statistics; PyTorch's momentum weighs the new batch
NORM_EPS = 1e-12
OUTPUT_SCALE = 1 / 9
WHITEN_KERNEL = 2


def _norm(channels: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=NORM_EPS, momentum=NORM_MOMENTUM)
    norm.weight.requires_grad_(False)  # no learned scale: only the shift trains
    return norm


class ConvGroup(nn.Sequential):
    """conv 3×3 → max pool 2 → BatchNorm → GELU → conv 3×3 → BatchNorm → GELU (no conv biases)."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _norm(channels_out)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.norm2 = _norm(channels_out)
        self.act2 = nn.GELU()


class AirbenchNet(nn.Module):
    """airbench94's network.

    Args:
        num_classes: outputs of the last layer.
        width: channels of the first group (64 in airbench); the second and third have 4× as many.
        in_channels: channels of the input image; the whitening layer has 2·in_channels·2·2 filters.

    The last max pool covers the whole map (at 32 px it is airbench's 3×3 pool of a 3×3 map), so that other
    image sizes work too.
    """

    stage_paths: ClassVar[dict[str, str]] = {"whiten": "whiten", "block1": "block1", "block2": "block2",
                                             "block3": "block3", "pool": "pool", "fc": "fc"}

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.width = width
        whitened = 2 * in_channels * WHITEN_KERNEL ** 2
        self.whiten = nn.Sequential(nn.Conv2d(in_channels, whitened, WHITEN_KERNEL, bias=True), nn.GELU())
        self.block1 = ConvGroup(whitened, width)
        self.block2 = ConvGroup(width, 4 * width)
        self.block3 = ConvGroup(4 * width, 4 * width)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * width, num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.whiten(x))))
        return self.fc(self.pool(x)) * OUTPUT_SCALE


def airbench94(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> AirbenchNet:
    """airbench94's network (Keller Jordan 2024) for 32 px: groups of ``width``, 4× and 4× channels."""
    return AirbenchNet(num_classes, width, in_channels)
