"""Input pipelines compared batch for batch: normalised 224 px batches of 64, ready for the model.

Ways to turn stored 32 px uint8 images into network inputs:

* ``assignment``: per-image PIL resize, ToTensor and Normalize in two DataLoader workers
  (:mod:`benchmarks.assignment`);
* ``cnnlab``: :class:`cnnlab.data.loader.TrainBatches`, whole batches normalised and resized with
  tensor ops in the training process (what the trainer does);
* ``cnnlab-channels-last``: the same, handing out channels-last batches;
* ``cnnlab-interpolate``: the same, but resizing with torch's bilinear kernel (``F.interpolate``),
  as cnnlab did before it used two matrix products (:func:`cnnlab.core.transforms.resize`);
* ``cnnlab-resize-first``: torch's kernel, and resizing before normalising, as cnnlab did at first:
  every normalisation op then touches 49× more values.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from benchmarks import assignment
from cnnlab.core.spec import Preprocess
from cnnlab.core.transforms import per_channel, to_input
from cnnlab.data.loader import TrainBatches

PIPELINES = ("assignment", "cnnlab", "cnnlab-channels-last", "cnnlab-interpolate", "cnnlab-resize-first")

Batch = tuple[torch.Tensor, torch.Tensor]


def resize_then_normalise(x: torch.Tensor, image_size: int, mean: Sequence[float], std: Sequence[float],
                          channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, C, H, W) → normalised float input, resizing first (the slower order)."""
    c = x.shape[1]
    x = F.interpolate(x.float().div_(255), size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(per_channel(mean, c)).view(1, c, 1, 1)) / torch.tensor(per_channel(std, c)).view(1, c, 1, 1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class InterpolateBatches(TrainBatches):
    """:class:`TrainBatches` resizing its normalised batches with ``F.interpolate``."""

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        p = self.preprocess
        x = to_input(x, x.shape[-1], p.mean, p.std)  # normalised only: the size is unchanged
        x = F.interpolate(x, size=(p.size, p.size), mode="bilinear", align_corners=False)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class ResizeFirstBatches(TrainBatches):
    """:class:`TrainBatches` with :func:`resize_then_normalise` as its last step."""

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        p = self.preprocess
        return resize_then_normalise(x, p.size, p.mean, p.std, self.channels_last)


def batches(kind: str, images: torch.Tensor, labels: torch.Tensor, image_size: int = 224,
            batch_size: int = 64, seed: int = 0) -> Iterator[Batch]:
    """Endless training batches of pipeline ``kind`` (one of PIPELINES), epoch after epoch."""
    if kind == "assignment":
        loader = assignment.loader(images, labels, image_size, batch_size, seed=seed)
        # One iterator per epoch, as a training loop does; its workers start on the first batch.
        return itertools.chain.from_iterable(iter(loader) for _ in itertools.count())
    if kind not in PIPELINES:
        raise ValueError(f"unknown pipeline {kind!r}; choose one of {PIPELINES}")
    cls = {"cnnlab-resize-first": ResizeFirstBatches, "cnnlab-interpolate": InterpolateBatches}.get(kind, TrainBatches)
    preprocess = Preprocess(image_size, images.shape[1], assignment.MEAN, assignment.STD)
    source = cls(images, labels, batch_size, preprocess,
                 augment="none", seed=seed, channels_last=kind == "cnnlab-channels-last")
    # TrainBatches may add fields after (inputs, labels), e.g. the global batch size under DDP.
    return (item[:2] for e in itertools.count() for item in source.epoch(e))


def batches_per_second(stream: Iterator[Batch], warmup: int, count: int) -> dict[str, float]:
    """Time ``count`` batches drawn from ``stream`` after ``warmup`` (worker start-up, first allocations)."""
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(count):
        x, _ = next(stream)
    seconds = time.perf_counter() - start
    return {"batches_per_s": count / seconds, "images_per_s": count * x.shape[0] / seconds,
            "seconds": seconds, "batch_shape": list(x.shape)}
