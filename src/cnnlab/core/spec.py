"""The typed contract a trained network travels with: what to build, and how its inputs are made.

A checkpoint stores both; everything that reads a run (evaluate, predict, visualize, report, export)
gets a :class:`ModelSpec` and a :class:`Preprocess` instead of loose dictionaries and
(image_size, mean, std) triples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.core import images, transforms

# A file larger than this (or than the network's input) is shrunk with PIL before the bilinear
# resize to the network's size, which does not antialias: as mixed-size training folders are stored.
MAX_FILE_SIDE = 256


@dataclass(frozen=True)
class ModelSpec:
    """What :func:`cnnlab.models.build` needs to rebuild a network before loading its weights.

    ``name`` is a cnnlab model or ``torchvision:NAME`` / ``timm:NAME``; ``width`` is None for the latter,
    whose widths are their own.
    """

    name: str
    num_classes: int
    width: int | None
    in_channels: int = 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        width = d.get("width")
        return cls(str(d["name"]), int(d["num_classes"]), None if width is None else int(width),
                   int(d.get("in_channels", 3)))


@dataclass(frozen=True)
class Preprocess:
    """uint8 pixels → network input: normalise per channel, then resize bilinearly to ``size``.

    ``mean`` and ``std`` hold one value per channel (a recipe's RGB statistics on one-channel data
    are averaged, see :func:`cnnlab.core.transforms.per_channel`).
    """

    size: int
    channels: int
    mean: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    std: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in transforms.per_channel(self.mean, self.channels)))
        object.__setattr__(self, "std", tuple(float(v) for v in transforms.per_channel(self.std, self.channels)))

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "channels": self.channels, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(int(d["size"]), int(d["channels"]), tuple(d["mean"]), tuple(d["std"]))

    def to_input(self, pixels: Tensor, channels_last: bool = False) -> Tensor:
        """uint8 (B, C, H, W) on any device → float (B, C, size, size) network input there."""
        return transforms.to_input(pixels, self.size, self.mean, self.std, channels_last)

    def read(self, path: str | Path) -> Tensor:
        """uint8 (C, H, W) pixels of one image file, decoded as training data is (see :mod:`cnnlab.core.images`):
        cropped to its centred square, large ones shrunk. ``ValueError`` says what is wrong with the file."""
        return torch.from_numpy(images.decode(path, self.channels, max_side=max(MAX_FILE_SIDE, self.size)))

    def from_files(self, paths: Sequence[str | Path]) -> Tensor:
        """The network input for image files, one row each; ``ValueError`` names the file that fails."""
        rows = []
        for path in paths:
            try:
                rows.append(self.to_input(self.read(path)[None]))
            except ValueError as e:
                raise ValueError(f"cannot read image {path}: {e}") from None
        return torch.cat(rows) if rows else torch.zeros(0, self.channels, self.size, self.size)

    def stats(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Mean and std as (1, C, 1, 1) tensors."""
        shape = (1, self.channels, 1, 1)
        return (torch.tensor(self.mean, device=device).view(shape), torch.tensor(self.std, device=device).view(shape))

    def to_pixels(self, x: Tensor) -> Tensor:
        """Network input back to the image the network saw, in [0, 1]."""
        mean, std = self.stats(x.device)
        return (x * std.to(x.dtype) + mean.to(x.dtype)).clamp(0, 1)

    def normalizer(self) -> nn.Module:
        """A module taking images in [0, 1] to network input at their current size, for methods that
        optimise pixels and for exported models that take pixels."""
        return Normalize(self)


class Normalize(nn.Module):
    """(x − mean) / std with the statistics as buffers, so that it moves, traces and exports with a model."""

    def __init__(self, preprocess: Preprocess) -> None:
        super().__init__()
        mean, std = preprocess.stats()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std
