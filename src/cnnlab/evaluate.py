"""Scoring a model on a labelled set: loss, top-1, per-class accuracy and the confusion matrix.

``score`` is what the trainer calls after every epoch; ``evaluate`` is the command: it loads a run or
checkpoint, scores the test set the run reported on, and writes ``eval/metrics.json`` and
``eval/confusion.png``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnlab.data.loader import eval_batches


@dataclass
class Scores:
    loss: float
    top1: float
    predictions: torch.Tensor  # int64 (N,) on the CPU
    labels: torch.Tensor


def logits(model: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """float32 logits of ``model`` for inputs ``x``; with ``tta``, averaged with those of the mirror images."""
    out = model(x).float()
    return (out + model(x.flip(-1)).float()) / 2 if tta else out


@torch.no_grad()
def score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, image_size: int,
          mean: Sequence[float], std: Sequence[float], batch_size: int = 256, amp: bool = False,
          channels_last: bool = False, tta: bool = False) -> Scores:
    """Mean cross-entropy and top-1 accuracy of ``model`` (put in eval mode) on uint8 ``images``.

    ``tta``: test-time flip augmentation, the logits of each image averaged with those of its mirror
    image (a free gain for models trained with flips; twice the forward passes).
    """
    was_training = model.training
    model.eval()
    device = images.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    loss_sum = torch.zeros((), device=device)
    preds = []
    for x, y in eval_batches(images, labels, batch_size, image_size, mean, std, channels_last):
        with autocast:
            out = logits(model, x, tta)
        loss_sum += F.cross_entropy(out, y, reduction="sum")
        preds.append(out.argmax(1))
    model.train(was_training)
    predictions = torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)
    n = max(len(labels), 1)
    y = labels.cpu()
    return Scores(loss_sum.item() / n, (predictions == y).sum().item() / n, predictions, y)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Row = true class, column = predicted class."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def report(scores: Scores, classes: list[str]) -> dict[str, Any]:
    """The ``evaluate --json`` document."""
    confusion = confusion_matrix(scores.predictions, scores.labels, len(classes))
    totals = confusion.sum(1)
    per_class = {c: int(confusion[i, i]) / int(totals[i]) if totals[i] else None for i, c in enumerate(classes)}
    return {"top1": scores.top1, "n": len(scores.labels), "loss": scores.loss,
            "per_class": per_class, "confusion": confusion.tolist()}


def evaluate(path: str | Path, dataset: str | None = None, data_dir: str | None = None,
             limit_test: int | None = None, device: str = "auto", out: str | Path | None = None,
             tta: bool | None = None) -> dict[str, Any]:
    """Score a run folder or checkpoint on its test set; write JSON and a confusion-matrix PNG.

    ``tta``: average each image's logits with its mirror image's (see :func:`score`); by default as
    the run scored itself, so that the number it reported is the number found again.
    """
    from cnnlab import run
    from cnnlab.data import load_dataset
    from cnnlab.data.splits import reported_test_set
    from cnnlab.train.device import pick_device

    loaded = run.load(path, device=pick_device(device))
    config = loaded.config
    spec = dataset or config.get("dataset", "cifar10")
    if limit_test is None and dataset is None:
        limit_test = config.get("limit_test")  # the same images the run reported on
    data = load_dataset(spec, data_dir=data_dir or config.get("data_dir"),
                        skip_bad_images=config.get("skip_bad_images", False))
    run.check_classes(loaded, data.classes, spec)
    x, y = reported_test_set(data, limit_test)
    dev = next(loaded.model.parameters()).device
    tta = loaded.tta if tta is None else tta
    scores = score(loaded.model, x.to(dev), y.to(dev), image_size=loaded.spec["image_size"],
                   mean=loaded.mean, std=loaded.std, tta=tta)
    result = report(scores, loaded.classes)
    result["tta"] = tta
    result["checkpoint"] = str(loaded.path)
    result["dataset"] = spec

    out_dir = Path(out) if out else (loaded.run_dir or loaded.path.parent) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    plot_confusion(result, loaded.classes, out_dir / "confusion.png")
    result["outputs"] = [str(out_dir / "metrics.json"), str(out_dir / "confusion.png")]
    return result


def plot_confusion(result: dict[str, Any], classes: list[str], path: Path) -> None:
    """Row-normalised confusion matrix with counts, readable for up to a few dozen classes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.tensor(result["confusion"], dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    k = len(classes)
    size = max(5.0, 0.55 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=120)
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix — top-1 {100 * result['top1']:.1f}% on {result['n']} test images")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
