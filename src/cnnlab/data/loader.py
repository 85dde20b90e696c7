"""Batches straight from uint8 tensors that live on the training device: no workers, no per-image PIL.

A dataset that does not fit stays in the memory-mapped cache instead (``place``): each rank reads
the images of its part of each batch in a background thread, pinned and copied asynchronously on
CUDA, and the same flips, crops, resize and normalisation follow on the device.

Every epoch's order and augmentation come from a generator seeded by (seed, epoch) alone, so a run
resumed at any step sees exactly the batches the uninterrupted run would have seen. With several
ranks, each draws the same global batches and keeps its own contiguous slice of each: together they
see what one process would, whatever the number of ranks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cnnlab.core import transforms
from cnnlab.core.spec import Preprocess
from cnnlab.data.splits import Splits
from cnnlab.data.store import PixelStore, memory_budget_bytes

log = logging.getLogger(__name__)

CROP_PAD = 4  # pixels at the stored resolution, as in He et al. (2015) §4.2 for CIFAR


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Distinct, reproducible streams per epoch; the multiplier keeps (seed, epoch) pairs apart.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@dataclass
class TrainBatches:
    """The training set of one run: yields normalised (inputs, labels) batches for an epoch."""

    images: torch.Tensor | PixelStore  # uint8 (N, C, H, W) on (or handed out on) the training device
    labels: torch.Tensor  # int64 (N,) on the training device
    batch_size: int
    preprocess: Preprocess
    augment: str = "none"
    seed: int = 0
    channels_last: bool = False
    rank: int = 0
    world: int = 1
    merge_single: bool = True  # a last batch of one image joins the one before (for BatchNorm models)

    def __len__(self) -> int:
        # The last, smaller batch is kept, unless it is too small to give every rank an image, or a
        # single image (which BatchNorm cannot normalise): then it joins the batch before it.
        full, rest = divmod(len(self.labels), self.batch_size)
        return full + (rest >= self.world and not self.merged)

    @property
    def dropped(self) -> int:
        """Images per epoch left out because the last batch could not be split over the ranks."""
        rest = len(self.labels) % self.batch_size
        return rest if rest < self.world else 0

    @property
    def merged(self) -> int:
        """Images per epoch (0 or 1) that join the second-to-last batch rather than form a batch of one."""
        full, rest = divmod(len(self.labels), self.batch_size)
        return 1 if self.merge_single and rest == 1 and self.world == 1 and full >= 1 else 0

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """This rank's part of each batch of ``epoch``, and the global batch's size; skips the first ``start``."""
        n = len(self.labels)
        g = epoch_generator(self.seed, epoch)
        if isinstance(self.images, PixelStore):
            yield from self._streamed(g, n, start)
            return
        # Drawn on the CPU so the stream is the same on every device, then moved once per epoch.
        order = torch.randperm(n, generator=g).to(self.images.device)
        flips = (torch.rand(n, generator=g) < 0.5).to(self.images.device)
        offsets = torch.randint(0, 2 * CROP_PAD + 1, (n, 2), generator=g).to(self.images.device)
        last = len(self) - 1
        for i in range(start, len(self)):
            end = n if i == last and self.merged else (i + 1) * self.batch_size
            batch = order[i * self.batch_size:end]
            idx = batch.tensor_split(self.world)[self.rank]
            x = self.images[idx]
            if self.augment == "flip-crop":
                x = transforms.flip(x, flips[idx])
                x = transforms.pad_crop(x, offsets[idx], CROP_PAD)
            yield self.prepare(x), self.labels[idx], len(batch)

    def _streamed(self, g: torch.Generator, n: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """``epoch`` for images in the cache: the same draws, and only this rank's images are read."""
        device = self.labels.device
        order = torch.randperm(n, generator=g)
        flips = (torch.rand(n, generator=g) < 0.5).to(device)
        offsets = torch.randint(0, 2 * CROP_PAD + 1, (n, 2), generator=g).to(device)
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(start, len(self))]
        mine = [batch.tensor_split(self.world)[self.rank] for batch in batches]
        for batch, cpu_idx, x in zip(batches, mine, self.images.batches(mine)):
            idx = cpu_idx.to(device)
            if self.augment == "flip-crop":
                x = transforms.flip(x, flips[idx])
                x = transforms.pad_crop(x, offsets[idx], CROP_PAD)
            yield self.prepare(x), self.labels[idx], len(batch)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.preprocess.to_input(x, self.channels_last)


def place(data: Splits, device: torch.device, on_device: bool | None = None, world: int = 1) -> Splits:
    """The splits with their pixels in memory, for the trainer to move onto ``device`` whole, or left in
    the cache and read a batch at a time (views that hand their images out on ``device``).

    ``on_device``: True or False forces either; None chooses: in memory when all the pixels (of
    every rank on this machine) fit in the memory budget and, on a GPU, in a quarter of its memory.
    """
    views = [x for x in (data.train_x, data.val_x, data.test_x) if isinstance(x, PixelStore)]
    if not views:
        return data
    nbytes = sum(x.nbytes for x in views)
    if on_device is None:
        budget = memory_budget_bytes() // max(world, 1)
        if device.type == "cuda":
            budget = min(budget, torch.cuda.get_device_properties(device).total_memory // 4)
        on_device = nbytes <= budget
        if not on_device:
            log.info(f"the dataset's {nbytes / 2**30:.1f} GiB of pixels exceed the {budget / 2**30:.1f} GiB "
                     f"budget for holding them in memory: batches are read from the cache in {views[0].path.parent}")
    fields = ("train_x", "val_x", "test_x")
    if on_device:
        return dataclasses.replace(data, **{f: _read(getattr(data, f)) for f in fields})
    return dataclasses.replace(data, **{f: getattr(data, f).to(device) for f in fields})


def _read(x: torch.Tensor | PixelStore) -> torch.Tensor:
    return x.read() if isinstance(x, PixelStore) else x
