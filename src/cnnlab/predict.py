"""Top-k labels with probabilities for image files and folders, preprocessed exactly as in training.

Each file is decoded by the one image decoder (:mod:`cnnlab.core.images`) the way training data is
(RGB, or 8-bit grayscale for one-channel models), cropped to a centred square, and then resized and
normalised by the run's :class:`~cnnlab.core.spec.Preprocess` — the same bilinear resize and
normalisation the trainer, ``evaluate`` and ``visualize`` apply. A 32×32 CIFAR image therefore gets
exactly the prediction ``evaluate`` gives it.

A file that cannot be read as an image does not stop the others: its entry carries an ``error``
instead of ``top``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cnnlab import run
from cnnlab.core.device import pick_device
from cnnlab.core.errors import UserError
from cnnlab.core.metrics import logits

BATCH_SIZE = 64


def predict(path: str | Path, inputs: str | Path | Sequence[str | Path], top_k: int = 5,
            device: str = "auto", batch_size: int = BATCH_SIZE, tta: bool | str | None = None) -> list[dict[str, Any]]:
    """Predict every image in ``inputs`` (files, or folders searched recursively) with a run or checkpoint.

    ``tta``: average each image's logits with its mirror image's before the softmax; by default as the
    run scored itself, so that predictions agree with ``cnnlab evaluate``'s. Where ``cnnlab evaluate
    --calibrate`` kept a temperature for the checkpoint, the probabilities are the softmax of the logits
    divided by it (the ranking is the same).

    Returns one dict per file, in order: ``{"image": path, "top": [{"label", "prob"}, …], "temperature":
    T or None}`` with the ``top_k`` most probable classes, or ``{"image": path, "error": reason}`` for a
    file that is not a readable image.
    """
    if top_k < 1:
        raise UserError(f"`top_k` must be at least 1 (got {top_k})")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1 (got {batch_size})")
    files = list(expand(inputs))
    if not files:
        raise UserError("no image files given; name image files or folders that hold them")
    loaded = run.load(path, device=pick_device(device))
    dev = loaded.device
    k = min(top_k, len(loaded.classes))
    tta = loaded.tta if tta is None else tta
    temperature = loaded.temperature

    results: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        entries: list[dict[str, Any]] = []
        batch: list[torch.Tensor] = []
        for file, problem in chunk:
            entry: dict[str, Any] = {"image": str(file)}
            if problem is None:
                try:
                    pixels = loaded.preprocess.read(file)
                except ValueError as e:
                    problem = str(e)
                else:
                    batch.append(loaded.preprocess.to_input(pixels[None].to(dev)))
            if problem is not None:
                entry["error"] = problem
            entries.append(entry)
        if batch:
            good = iter(e for e in entries if "error" not in e)
            for entry, top in zip(good, ranked(loaded.model, loaded.classes, torch.cat(batch), k, tta, temperature)):
                entry["top"] = [{"label": t["label"], "prob": t["prob"]} for t in top]
                entry["temperature"] = temperature
        results.extend(entries)
    return results


def ranked(model: torch.nn.Module, classes: Sequence[str], x: torch.Tensor, top_k: int,
           tta: bool | str, temperature: float | None = None) -> list[list[dict[str, Any]]]:
    """The ``top_k`` most probable classes of each network input of ``x``, most probable first:
    ``[{"label", "index", "prob"}, …]`` per image (what ``predict`` and ``cnnlab serve`` show); the
    probabilities are the softmax of the logits divided by ``temperature`` when one is given."""
    with torch.no_grad():
        probs = torch.softmax(logits(model, x, tta) / (temperature or 1.0), dim=1)
    values, indices = probs.topk(min(top_k, len(classes)), dim=1)
    return [[{"label": classes[i], "index": i, "prob": v} for v, i in zip(vals, idxs)]
            for vals, idxs in zip(values.tolist(), indices.tolist())]


def expand(inputs: str | Path | Sequence[str | Path]) -> Iterator[tuple[Path, str | None]]:
    """(file, problem) pairs: files as given, folders walked recursively in sorted order.

    Every non-hidden file in a folder is tried (a stray text file is reported, not silently skipped);
    a path that does not exist, or a folder with no files, comes back with its problem.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = False
            for folder, subdirs, names in os.walk(item):
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith("."):
                        found = True
                        yield Path(folder, name), None
            if not found:
                yield item, "the folder holds no files"
        elif item.exists():
            yield item, None
        else:
            yield item, "no such file or folder"
