"""Batches straight from uint8 tensors that live on the training device: no workers, no per-image PIL.

Every epoch's order and augmentation come from a generator seeded by (seed, epoch) alone, so a run
resumed at any step sees exactly the batches the uninterrupted run would have seen. With several
ranks, each draws the same global batches and keeps its own contiguous slice of each: together they
see what one process would, whatever the number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cnnlab.core import transforms
from cnnlab.core.spec import Preprocess

CROP_PAD = 4  # pixels at the stored resolution, as in He et al. (2015) §4.2 for CIFAR


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Distinct, reproducible streams per epoch; the multiplier keeps (seed, epoch) pairs apart.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@dataclass
class TrainBatches:
    """The training set of one run: yields normalised (inputs, labels) batches for an epoch."""

    images: torch.Tensor  # uint8 (N, C, H, W) on the training device
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

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.preprocess.to_input(x, self.channels_last)
