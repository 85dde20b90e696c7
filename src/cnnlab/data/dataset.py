"""A labelled dataset as the rest of cnnlab sees it, opened from a ``dataset`` spec.

Every source becomes the same thing: an entry of the pixel cache (:mod:`cnnlab.data.store`), uint8
images (N, C, H, W) per split with int64 labels and the class names, keyed by the source's content
(:mod:`cnnlab.data.readers` holds one reader per kind of source). ``open_dataset`` hands the splits
out as :class:`~cnnlab.data.store.PixelStore` views of the cache files, read a batch at a time;
``load_dataset`` reads them into tensors.

Images that are files are stored at one size: as they are when they all share a size no larger than
the run's ``image_size``; else cropped to the centred square and resized (antialiased) to
``store_size`` if given, otherwise to the smaller of ``image_size`` and the median shorter side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cnnlab.data.readers import Sizing, create_reader
from cnnlab.data.store import PixelStore


@dataclass
class Dataset:
    """A labelled dataset: uint8 pixels (N, C, H, W), in memory or in the cache's files."""

    name: str  # "cifar10", "sample", "folder:<path>", …
    classes: list[str]
    train_x: torch.Tensor | PixelStore  # C is 1 or 3
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor | PixelStore
    test_y: torch.Tensor
    skipped: list[str] = field(default_factory=list)  # unreadable images left out (--skip-bad-images)
    # sha256 of the source's content (files and folder names, or CIFAR-10's pixels and labels): a run
    # records it, and --resume refuses to continue on data that changed under the same class names.
    fingerprint: str = ""


def open_dataset(spec: str, data_dir: str | Path | None = None, download: bool = False,
                 skip_bad_images: bool = False, store_size: int | None = None,
                 image_size: int | None = None) -> Dataset:
    """The dataset named by ``spec`` (one of ``DATASET_CHOICES``), its pixels left in the cache files.

    An image that cannot be decoded stops the load with its name, unless ``skip_bad_images``: then
    it is left out and listed in ``Dataset.skipped``. ``store_size`` and ``image_size`` set the
    stored size of images that are files (see the module's description).
    """
    reader = create_reader(spec, data_dir, download)
    content = reader.content()
    entry = reader.entry(content, skip_bad_images, Sizing(store_size, image_size))
    return Dataset(spec, list(entry.meta["classes"]), entry.pixels("train"), entry.labels("train"),
                   entry.pixels("test"), entry.labels("test"), list(entry.meta.get("skipped", [])),
                   str(entry.meta.get("fingerprint", content)))


def load_dataset(spec: str, data_dir: str | Path | None = None, download: bool = False,
                 skip_bad_images: bool = False, store_size: int | None = None,
                 image_size: int | None = None) -> Dataset:
    """:func:`open_dataset`, with every split read into memory as a contiguous uint8 tensor."""
    data = open_dataset(spec, data_dir, download, skip_bad_images, store_size, image_size)
    data.train_x, data.test_x = data.train_x.read(), data.test_x.read()
    return data
