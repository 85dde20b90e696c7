"""Batches straight from uint8 tensors that live on the training device: no workers, no per-image PIL.

A dataset that does not fit stays in the memory-mapped cache instead (``place``): each rank reads
the images of its part of each batch in a background thread, pinned and copied asynchronously on
CUDA, and the same flips, crops, resize and normalisation follow on the device. Both are read by the
one loop of :meth:`TrainBatches.epoch`, through :class:`Pixels`, after one :class:`BatchPlan`: the
batches, their order and their augmentation are the same whichever holds the images.

Every epoch's order and augmentation come from a generator seeded by (seed, epoch) alone, so a run
resumed at any step sees exactly the batches the uninterrupted run would have seen. With several
ranks, each draws the same global batches and keeps its own contiguous slice of each: together they
see what one process would, whatever the number of ranks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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


def alternate_flips(seed: int, epoch: int, n: int) -> torch.Tensor:
    """Which of ``n`` images are mirrored in ``epoch`` with alternating flips (airbench, Jordan 2024): a random
    half, drawn once per run, on even epochs and the other half on odd ones, so each image is seen both
    ways every two epochs."""
    # A stream of its own, apart from every epoch's: the (seed, epoch) streams start at seed · 1_000_003.
    first = torch.rand(n, generator=torch.Generator().manual_seed(seed * 1_000_003 - 1)) < 0.5
    return first ^ bool(epoch % 2)


class Pixels(Protocol):
    """Where a training set's uint8 images (N, C, H, W) are read from, a batch at a time."""

    def batches(self, indices: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The images at each of ``indices`` (CPU index tensors) in turn, on the training device."""
        ...


@dataclass
class HeldPixels:
    """:class:`Pixels` held whole in a tensor on the training device (a :class:`PixelStore` is the other kind)."""

    images: torch.Tensor

    def batches(self, indices: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        if not indices:
            return iter(())
        # The epoch's indices go to the device in one copy: on CUDA a copy per batch would wait for the GPU.
        flat = torch.cat(list(indices)).to(self.images.device)
        return (self.images[index] for index in flat.split([len(index) for index in indices]))


@dataclass(frozen=True)
class BatchPlan:
    """Which positions of an epoch's shuffled order make up each global batch, and each rank's part of it.

    Batches are ``batch_size`` positions one after another. The last, smaller batch is kept, unless it is
    a single image that ``merge_single`` (BatchNorm cannot normalise one image) makes join the batch
    before it, or is too small to give every rank an image: then it is left out (``dropped``). The same
    rule holds for any number of ranks, so that several ranks see the batches one process would.
    """

    images: int
    batch_size: int
    world: int = 1
    merge_single: bool = True

    @property
    def merged(self) -> int:
        """Images per epoch (0 or 1) that join the second-to-last batch rather than form a batch of one."""
        full, rest = divmod(self.images, self.batch_size)
        return 1 if self.merge_single and rest == 1 and full >= 1 else 0

    @property
    def dropped(self) -> int:
        """Images per epoch left out because the last batch could not be split over the ranks."""
        rest = self.images % self.batch_size
        return rest if rest < self.world and not self.merged else 0

    def __len__(self) -> int:
        full, rest = divmod(self.images, self.batch_size)
        return full + (rest > 0 and not self.merged and not self.dropped)

    def spans(self, start: int = 0) -> list[tuple[int, int]]:
        """(first, end) positions of each global batch, from the ``start``-th on."""
        last, end = len(self) - 1, self.images - self.dropped
        b = self.batch_size
        return [(i * b, end if i == last else (i + 1) * b) for i in range(start, len(self))]

    def part(self, span: tuple[int, int], rank: int) -> tuple[int, int]:
        """``rank``'s contiguous part of a global batch, split as ``torch.tensor_split`` splits: nearly evenly,
        the first ranks taking one image more."""
        first, end = span
        size, extra = divmod(end - first, self.world)
        lo = first + rank * size + min(rank, extra)
        return lo, lo + size + (rank < extra)


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
    alternate: bool = False  # with flip-crop: alternating rather than random flips
    translate: int | None = None  # with flip-crop: pixels of reflected shift (None: CROP_PAD, zero padding)
    plan: BatchPlan = field(init=False)
    source: Pixels = field(init=False)

    def __post_init__(self) -> None:
        self.plan = BatchPlan(len(self.labels), self.batch_size, self.world, self.merge_single)
        self.source = self.images if isinstance(self.images, PixelStore) else HeldPixels(self.images)

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def dropped(self) -> int:
        return self.plan.dropped

    @property
    def merged(self) -> int:
        return self.plan.merged

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """This rank's part of each batch of ``epoch``, and the global batch's size; skips the first ``start``."""
        n, device = len(self.labels), self.labels.device
        g = epoch_generator(self.seed, epoch)
        # Drawn on the CPU so the stream is the same on every device. Each image's label and draws are put
        # in the epoch's order and moved once: a batch's are then a slice of each.
        order = torch.randperm(n, generator=g)
        flips = torch.rand(n, generator=g) < 0.5  # drawn either way: the shifts come from the same stream
        if self.alternate:
            flips = alternate_flips(self.seed, epoch, n)
        flips = flips[order].to(device)
        pad = CROP_PAD if self.translate is None else self.translate
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)[order].to(device)
        labels = self.labels[order.to(device)]
        spans = self.plan.spans(start)
        parts = [self.plan.part(span, self.rank) for span in spans]
        pixels = self.source.batches([order[lo:hi] for lo, hi in parts])
        for (first, end), (lo, hi), x in zip(spans, parts, pixels):
            if self.augment == "flip-crop":
                x = transforms.flip(x, flips[lo:hi])
                x = transforms.pad_crop(x, offsets[lo:hi], pad, reflect=self.translate is not None)
            yield self.prepare(x), labels[lo:hi], end - first

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
