"""The typed contract a trained network travels with: what to build, and how its inputs are made.

A checkpoint stores both; everything that reads a run (evaluate, predict, visualize, report, export)
gets a :class:`ModelSpec` and a :class:`Preprocess` instead of loose dictionaries and
(image_size, mean, std) triples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.core import images, transforms
from cnnlab.core.limits import MAX_CLASSES, MAX_IMAGE_SIZE, MAX_WIDTH, MIN_IMAGE_SIZE

# A file larger than this (or than the network's input) is shrunk with PIL before the bilinear
# resize to the network's size, which does not antialias: as mixed-size training folders are stored.
MAX_FILE_SIDE = 256

CHANNELS = (1, 3)


def _whole(d: dict[str, Any], key: str, low: int, high: int, where: str, default: int | None = None) -> int:
    """``d[key]`` as a whole number in [low, high]; ``ValueError`` naming it otherwise."""
    value = d.get(key, default)
    if value is None:
        raise ValueError(f"{where} has no {key}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}.{key} is {value!r}, not a whole number")
    if not low <= value <= high:
        raise ValueError(f"{where}.{key} is {value}, outside {low}…{high}")
    return value


def _numbers(values: Any, where: str, positive: bool = False) -> tuple[float, ...]:
    """One or three finite numbers (a mean or a std); ``ValueError`` saying what is wrong otherwise."""
    if not isinstance(values, (list, tuple)) or len(values) not in CHANNELS:
        raise ValueError(f"{where} is {values!r}, not a list of 1 or 3 numbers")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{where} holds {v!r}, not a finite number")
        if positive and v <= 0:
            raise ValueError(f"{where} holds {v!r}; a standard deviation must be above 0")
    return tuple(float(v) for v in values)


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
        """Checked against the bounds above; ``ValueError`` names the field that is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"model_spec is {type(d).__name__}, not a table of values")
        name = d.get("name")
        if not isinstance(name, str) or not name or len(name) > 100:
            raise ValueError(f"model_spec.name is {name!r}, not a model name")
        in_channels = d.get("in_channels", 3)
        if isinstance(in_channels, bool) or in_channels not in CHANNELS:
            raise ValueError(f"model_spec.in_channels is {in_channels!r}, not 1 or 3")
        # Models with widths of their own (torchvision:, timm:) have none.
        width = None if d.get("width") is None else _whole(d, "width", 1, MAX_WIDTH, "model_spec")
        return cls(name, _whole(d, "num_classes", 1, MAX_CLASSES, "model_spec"), width, int(in_channels))


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
    def from_dict(cls, d: dict[str, Any], where: str = "preprocess") -> Preprocess:
        """Checked: size within bounds, 1 or 3 channels, finite statistics and a std above 0."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} is {type(d).__name__}, not a table of values")
        channels = d.get("channels")
        if isinstance(channels, bool) or channels not in CHANNELS:
            raise ValueError(f"{where}.channels is {channels!r}, not 1 or 3")
        return cls(_whole(d, "size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, where), int(channels),
                   _numbers(d.get("mean"), f"{where}.mean"), _numbers(d.get("std"), f"{where}.std", positive=True))

    def to_input(self, pixels: Tensor, channels_last: bool = False) -> Tensor:
        """uint8 (B, C, H, W) on any device → float (B, C, size, size) network input there."""
        return transforms.to_input(pixels, self.size, self.mean, self.std, channels_last)

    def read(self, source: str | Path | bytes, max_bytes: int = images.MAX_DECODED_BYTES) -> Tensor:
        """uint8 (C, H, W) pixels of one image file (or its bytes, as uploaded), decoded as training data is
        (see :mod:`cnnlab.core.images`): cropped to its centred square, large ones shrunk. ``ValueError``
        says what is wrong with the file (``images.TooLarge`` when its pixels would take more than
        ``max_bytes``)."""
        return torch.from_numpy(images.decode(source, self.channels, max_side=max(MAX_FILE_SIDE, self.size),
                                              max_bytes=max_bytes))

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
