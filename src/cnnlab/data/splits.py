"""Subsets and the held-out validation split, drawn reproducibly from the training set.

The validation images are taken out of the training set so that checkpoints are chosen without ever
looking at the test set; the test set is only reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cnnlab.core.errors import UserError
from cnnlab.data.dataset import Dataset
from cnnlab.data.store import PixelStore, take

SPLIT_SEED = 20151210  # fixed, so every run on a dataset holds out the same images (arXiv 1512.03385)


@dataclass
class Splits:
    classes: list[str]
    train_x: torch.Tensor | PixelStore  # uint8 (N, C, H, W); a store's views are read a batch at a time
    train_y: torch.Tensor
    val_x: torch.Tensor | PixelStore
    val_y: torch.Tensor
    test_x: torch.Tensor | PixelStore
    test_y: torch.Tensor
    skipped: list[str] = field(default_factory=list)  # images the source could not read and left out
    fingerprint: str = ""  # the source's content hash (Dataset.fingerprint)
    # Where each training and validation image sits among the dataset's training images (what names an
    # image across runs, e.g. in label_issues.json); None for splits not drawn by `split`.
    train_index: torch.Tensor | None = None
    val_index: torch.Tensor | None = None


def split(data: Dataset, limit_train: int | None = None, limit_test: int | None = None,
          val_split: int | None = None, batch_size: int | None = None) -> Splits:
    """Random subsets of ``limit_*`` images, then ``val_split`` images (default 10 %) held out of train.

    Subsets are random rather than the first N because image folders are ordered by class. A split
    asked for that would leave fewer training images than one batch of ``batch_size``, or than there
    are classes, is refused.
    """
    train = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train = train[:limit_train]
    test_x, test_y = reported_test_set(data, limit_test)
    if val_split is None:
        n_val = len(train) // 10
    else:
        n_val = val_split
        left, needed = len(train) - val_split, max(batch_size or 1, len(data.classes))
        if val_split > 0 and left < needed:
            why = (f"one batch (`batch_size` {batch_size})" if needed == batch_size and batch_size
                   else f"one per class ({len(data.classes)} classes)")
            raise UserError(f"`val_split` {val_split} would leave {max(left, 0)} of the {len(train)} training images "
                            f"to train on, fewer than {why}; hold out at most {max(len(train) - needed, 0)} "
                            "(or `val_split` 0 for none)")
    val, train = train[:n_val].sort().values, train[n_val:].sort().values
    return Splits(data.classes, take(data.train_x, train), data.train_y[train], take(data.train_x, val),
                  data.train_y[val], test_x, test_y, list(data.skipped), data.fingerprint, train, val)


def reported_test_set(data: Dataset, limit_test: int | None) -> tuple[torch.Tensor | PixelStore, torch.Tensor]:
    """The test images a run with ``limit_test`` reported on (the same draw as ``split``)."""
    n = len(data.test_y)
    if limit_test is None or limit_test >= n:
        return data.test_x, data.test_y
    g = torch.Generator().manual_seed(SPLIT_SEED + 1)
    test = torch.randperm(n, generator=g)[:limit_test].sort().values
    return take(data.test_x, test), data.test_y[test]
