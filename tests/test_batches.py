"""One epoch loop for images in memory and in the cache: the same batches, the last one too, on any number of ranks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab.config import resolve
from cnnlab.core import checkpoint
from cnnlab.core.spec import Preprocess
from cnnlab.data.loader import BatchPlan, TrainBatches
from cnnlab.data.store import PixelStore
from cnnlab.train import engine


@pytest.mark.parametrize("images,batch,world,merge,sizes,merged,dropped", [
    (193, 64, 1, True, [64, 64, 65], 1, 0),
    (193, 64, 2, True, [64, 64, 65], 1, 0),  # several ranks merge a last single image as one process does
    (193, 64, 1, False, [64, 64, 64, 1], 0, 0),
    (193, 64, 2, False, [64, 64, 64], 0, 1),  # one image cannot be split over two ranks
    (129, 64, 4, True, [64, 65], 1, 0),
    (65, 64, 1, True, [65], 1, 0),
    (64, 64, 1, True, [64], 0, 0),
    (195, 64, 4, True, [64, 64, 64], 0, 3),
    (195, 64, 2, True, [64, 64, 64, 3], 0, 0),
    (1, 64, 1, True, [1], 0, 0),  # nothing to join: the trainer refuses this for a BatchNorm model
])
def test_the_plan_of_an_epoch(images, batch, world, merge, sizes, merged, dropped):
    plan = BatchPlan(images, batch, world, merge)
    spans = plan.spans()
    assert [end - first for first, end in spans] == sizes and len(plan) == len(sizes)
    assert (plan.merged, plan.dropped) == (merged, dropped)
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == images - dropped
    assert plan.spans(1) == spans[1:]
    for span in spans:  # the ranks' parts tile the batch as torch.tensor_split would split it
        expected = torch.arange(*span).tensor_split(world)
        assert [torch.arange(*plan.part(span, r)).tolist() for r in range(world)] == [e.tolist() for e in expected]


def _store(tmp_path: Path, n: int) -> tuple[torch.Tensor, PixelStore]:
    """``n`` random 3×8×8 images, in memory and as a subset (in another order) of a larger cache file."""
    rng = np.random.default_rng(n)
    file = rng.integers(0, 256, (n + 7, 3, 8, 8), dtype=np.uint8)
    path = tmp_path / "train.u8"
    path.write_bytes(file.tobytes())
    rows = rng.permutation(n + 7)[:n]
    return torch.from_numpy(file[rows].copy()), PixelStore(path, file.shape).subset(rows)


def _epoch(images, n, rank=0, world=1, epoch=3, start=0, merge=True):
    batches = TrainBatches(images, torch.arange(n), 64, Preprocess(8, 3, (0.5,), (0.25,)), "flip-crop", seed=5,
                           rank=rank, world=world, merge_single=merge)
    return list(batches.epoch(epoch, start))


@pytest.mark.parametrize("n,sizes", [(193, [64, 64, 65]), (129, [64, 65]), (65, [65])])
def test_memory_and_cache_give_the_same_batches(tmp_path: Path, n: int, sizes: list[int]) -> None:
    held, stored = _store(tmp_path, n)
    memory, cache = _epoch(held, n), _epoch(stored, n)
    assert [len(y) for _, y, _ in memory] == [g for _, _, g in memory] == sizes
    assert sorted(torch.cat([y for _, y, _ in memory]).tolist()) == list(range(n))  # nothing left out
    assert len(cache) == len(memory)
    for (x1, y1, g1), (x2, y2, g2) in zip(memory, cache):
        assert torch.equal(y1, y2) and torch.equal(x1, x2) and g1 == g2
    assert not torch.equal(memory[0][0], _epoch(held, n, epoch=4)[0][0])  # the epoch changes the draws
    # Resumed mid-epoch from the cache: the very batches the whole epoch gave.
    for (x1, y1, _), (x2, y2, _) in zip(memory[1:], _epoch(stored, n, start=1)):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)


@pytest.mark.parametrize("n,world", [(193, 2), (129, 3)])
def test_ranks_reading_from_memory_or_the_cache_together_see_the_single_process_batches(tmp_path, n, world):
    held, stored = _store(tmp_path, n)
    single = _epoch(held, n)
    for images in (held, stored):
        ranks = [_epoch(images, n, rank, world) for rank in range(world)]
        assert all(len(r) == len(single) for r in ranks)
        for (x, y, g), *parts in zip(single, *ranks):
            assert all(part[2] == g for part in parts)  # every rank knows the global batch's size
            assert torch.equal(torch.cat([p[1] for p in parts]), y)
            assert torch.equal(torch.cat([p[0] for p in parts]), x)


TINY = dict(recipe="fast", dataset="sample", model="resnet18-cifar", width=4, image_size=16, epochs=1,
            batch_size=64, lr=0.1, val_split=32, limit_test=32, device="cpu", seed=3, augment="flip-crop")


@pytest.mark.parametrize("train_images,steps", [(193, 3), (65, 1)])
def test_a_tiny_model_trains_to_the_same_weights_from_memory_and_from_the_cache(tmp_path, caplog, train_images,
                                                                                 steps):
    runs = {}
    for on_device in (True, False):
        out = tmp_path / str(on_device)
        with caplog.at_level(logging.WARNING, logger="cnnlab"):
            caplog.clear()
            engine.train(resolve(overrides={**TINY, "limit_train": train_images + 32, "data_on_device": on_device,
                                            "out": str(out)}))
        assert "joins the batch before it" in caplog.text
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines if r["kind"] == "epoch"] == [steps]
        runs[on_device] = checkpoint.load(out / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(runs[True][k], runs[False][k]) for k in runs[True])
