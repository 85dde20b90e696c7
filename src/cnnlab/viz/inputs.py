"""The images a visualisation looks at, prepared the way the checkpoint says, and class targets.

Images come from files (any size or format PIL reads, resized and normalised as in training) or
from the test set the run reported on, by index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cnnlab.core import images
from cnnlab.core.errors import UserError
from cnnlab.core.spec import Preprocess

__all__ = ["Batch", "from_files", "from_test_set", "parse_target"]


@dataclass
class Batch:
    x: Tensor  # float (B, C, S, S), normalised network input
    names: list[str]  # one short name per image, for file names and titles
    labels: list[int | None]  # the true class where known


def from_files(paths: Sequence[str | Path], preprocess: Preprocess) -> Batch:
    """Image files decoded, resized and normalised exactly as ``predict`` reads them."""
    try:
        x = preprocess.from_files(paths)
    except ValueError as e:
        raise UserError(f"{e}; give an image file ({', '.join(images.formats())} …)") from None
    return Batch(x, [Path(p).stem for p in paths], [None] * len(x))


def from_test_set(images: Tensor, labels: Tensor, indices: Sequence[int], preprocess: Preprocess) -> Batch:
    """Test images by index (uint8 ``images`` as loaded), prepared as network input."""
    n = len(labels)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise UserError(f"`index` {bad[0]} is out of range; the run's test set has {n} images (0 … {n - 1})")
    idx = torch.tensor(list(indices), dtype=torch.long)
    return Batch(preprocess.to_input(images[idx]), [f"test{i}" for i in indices], [int(labels[i]) for i in indices])


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
        raise UserError(f"`target` {i} is out of range; the model has {len(classes)} classes (0 … {len(classes) - 1})")
    shown = ", ".join(classes[:20]) + (f" … ({len(classes)} in all)" if len(classes) > 20 else "")
    raise UserError(f"unknown class {text!r}; the model's classes are: {shown} (or give an index)")
