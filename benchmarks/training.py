"""Training throughput: full SGD steps, data included, for one way of running the same model.

A step is what the training loop does per batch: fetch the batch, forward, cross-entropy,
backward, SGD update. Timing whole steps (not just the model) keeps the input pipeline's cost, and
its competition with the model for the same cores, inside the figure.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from benchmarks import pipeline
from cnnlab.models import build
from cnnlab.train.device import compiled, keep_freed_memory

# The assignment's optimiser (and the seed recipe's).
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


@dataclass(frozen=True)
class Variant:
    """One way to run the same training: which input pipeline, layout, precision, compiler, threads."""

    name: str
    pipeline: str = "cnnlab"  # a name from benchmarks.pipeline.PIPELINES
    channels_last: bool = False
    compile: bool = False
    bf16: bool = False
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    keep_freed_memory: bool = True  # glibc keeps freed blocks for reuse, as the trainer sets it on a CPU

    def to_dict(self) -> dict:
        return asdict(self)


def make_step(model: nn.Module, variant: Variant, device: torch.device):
    """A function ``step(x, y) -> loss`` doing one SGD step of ``model`` as ``variant`` says."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                fused=device.type == "cuda" or None)
    criterion = nn.CrossEntropyLoss()
    forward = compiled(model, variant.compile, False, device)  # as the trainer compiles
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if variant.bf16 else nullcontext()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            loss = criterion(forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def measure(variant: Variant, images: torch.Tensor, labels: torch.Tensor, *, model_name: str = "resnet18-seed",
            width: int = 64, image_size: int = 224, batch_size: int = 64, warmup: int = 1, steps: int = 2,
            ) -> dict:
    """Images per second over ``steps`` CPU training steps of ``variant`` after ``warmup`` steps.

    The warm-up absorbs one-off costs (oneDNN kernel selection, DataLoader worker start,
    torch.compile); its duration is reported as ``warmup_s`` so that a slow compile is visible.
    """
    if variant.threads:
        torch.set_num_threads(variant.threads)
    if variant.keep_freed_memory:
        keep_freed_memory()
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build(model_name, num_classes=10, width=width)
    model.to(memory_format=torch.channels_last if variant.channels_last else torch.contiguous_format)
    model.train()
    step = make_step(model, variant, device)
    stream = pipeline.batches(variant.pipeline, images, labels, image_size, batch_size)

    start = time.perf_counter()
    for _ in range(warmup):
        step(*next(stream))
    warmup_s = time.perf_counter() - start
    seconds, losses = [], []
    for _ in range(steps):
        tick = time.perf_counter()
        losses.append(float(step(*next(stream))))
        seconds.append(time.perf_counter() - tick)
    return {"images_per_s": steps * batch_size / sum(seconds), "step_s": seconds, "warmup_s": warmup_s,
            "threads": torch.get_num_threads(), "loss": losses[-1]}
