"""The images a visualisation looks at, prepared the way the checkpoint says, and class targets.

Images come from files (any size or format PIL reads, resized and normalised as in training) or
from the test set the run reported on, by index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from cnnlab.data.transforms import per_channel, to_input
from cnnlab.errors import UserError

__all__ = ["Batch", "from_files", "from_test_set", "parse_target", "stats", "to_pixels"]


@dataclass
class Batch:
    x: Tensor  # float (B, C, S, S), normalised network input
    names: list[str]  # one short name per image, for file names and titles
    labels: list[int | None]  # the true class where known


def from_files(paths: Sequence[str | Path], image_size: int, mean: Sequence[float], std: Sequence[float],
               channels: int = 3) -> Batch:
    """Read, convert to the model's channels, resize (bilinear) and normalise each image."""
    xs = []
    for path in paths:
        path = Path(path)
        try:
            with Image.open(path) as img:
                img.load()
                pixels = np.asarray(img.convert("L" if channels == 1 else "RGB"))
        except (FileNotFoundError, IsADirectoryError):
            raise UserError(f"cannot read image {path}: no such file; give a path to an image file") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"cannot read image {path} ({type(e).__name__}); give a file PIL reads: "
                            f"{', '.join(_formats())}") from None
        u8 = torch.from_numpy(pixels.copy())
        u8 = u8[None] if u8.ndim == 2 else u8.permute(2, 0, 1)
        xs.append(to_input(u8[None], image_size, mean, std))
    return Batch(torch.cat(xs), [Path(p).stem for p in paths], [None] * len(xs))


def _formats() -> list[str]:
    Image.init()
    return sorted({ext.lstrip(".").upper() for ext in Image.registered_extensions()
                   if ext in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")})


def from_test_set(images: Tensor, labels: Tensor, indices: Sequence[int], image_size: int,
                  mean: Sequence[float], std: Sequence[float]) -> Batch:
    """Test images by index (uint8 ``images`` as loaded), prepared as network input."""
    n = len(labels)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise UserError(f"--index {bad[0]} is out of range; the run's test set has {n} images (0 … {n - 1})")
    idx = torch.tensor(list(indices), dtype=torch.long)
    x = to_input(images[idx], image_size, mean, std)
    return Batch(x, [f"test{i}" for i in indices], [int(labels[i]) for i in indices])


def stats(mean: Sequence[float], std: Sequence[float], channels: int, device: torch.device | str = "cpu",
          ) -> tuple[Tensor, Tensor]:
    """The normalisation as (1, C, 1, 1) tensors, for methods that optimise images in pixel space."""
    m = torch.tensor(per_channel(mean, channels), device=device).view(1, channels, 1, 1)
    s = torch.tensor(per_channel(std, channels), device=device).view(1, channels, 1, 1)
    return m, s


def to_pixels(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo the normalisation: the image as the network saw it, in [0, 1]."""
    m, s = stats(mean, std, x.shape[1], x.device)
    return (x * s + m).clamp(0, 1)


def parse_target(target: str | int | None, classes: Sequence[str]) -> int | None:
    """A class name or index as an index; ``None`` stays ``None`` (the predicted class)."""
    if target is None:
        return None
    text = str(target)
    if text in classes:
        return list(classes).index(text)
    if text.lstrip("-").isdigit():
        i = int(text)
        if 0 <= i < len(classes):
            return i
        raise UserError(f"--target {i} is out of range; the model has {len(classes)} classes (0 … {len(classes) - 1})")
    shown = ", ".join(classes[:20]) + (f" … ({len(classes)} in all)" if len(classes) > 20 else "")
    raise UserError(f"unknown class {text!r}; the model's classes are: {shown} (or give an index)")
