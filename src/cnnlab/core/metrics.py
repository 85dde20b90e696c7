"""Scores of a model on a labelled set: loss, top-1, per-class accuracy, the confusion matrix.

``score`` is what the trainer calls after every epoch and what ``evaluate``, the report and the
explorer call on a finished run; ``logits`` is the one place that knows flip test-time augmentation.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnlab.core.spec import Preprocess


@dataclass
class Scores:
    loss: float
    top1: float
    predictions: torch.Tensor  # int64 (N,) on the CPU
    labels: torch.Tensor
    confidence: torch.Tensor | None = None  # float (N,) on the CPU: the softmax probability of each prediction
    probabilities: torch.Tensor | None = None  # float (N, classes) on the CPU: the softmax of each image's logits


def logits(model: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """float32 logits of ``model`` for inputs ``x``; with ``tta``, averaged with those of the mirror images."""
    out = model(x).float()
    return (out + model(x.flip(-1)).float()) / 2 if tta else out


@torch.no_grad()
def score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, preprocess: Preprocess, *,
          batch_size: int = 256, amp: bool = False, channels_last: bool = False, tta: bool = False) -> Scores:
    """Mean cross-entropy and top-1 accuracy of ``model`` (put in eval mode) on uint8 ``images``.

    ``tta``: test-time flip augmentation, the logits of each image averaged with those of its mirror
    image (a free gain for models trained with flips; twice the forward passes).
    """
    was_training = model.training
    model.eval()
    device = images.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    loss_sum = torch.zeros((), device=device)
    preds, probabilities = [], []
    for i in range(0, len(labels), batch_size):
        x, y = preprocess.to_input(images[i:i + batch_size], channels_last), labels[i:i + batch_size]
        with autocast:
            out = logits(model, x, tta)
        loss_sum += F.cross_entropy(out, y, reduction="sum")
        preds.append(out.argmax(1))
        probabilities.append(out.float().softmax(1))
    model.train(was_training)
    predictions = torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)
    n = max(len(labels), 1)
    y = labels.cpu()
    probs = torch.cat(probabilities).cpu() if probabilities else torch.zeros(0, 0)
    return Scores(loss_sum.item() / n, (predictions == y).sum().item() / n, predictions, y,
                  probs.amax(1) if probabilities else torch.zeros(0), probs)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Row = true class, column = predicted class."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def breakdown(scores: Scores, classes: list[str]) -> dict[str, Any]:
    """Top-1, loss, per-class accuracy and the confusion matrix as plain values (``evaluate --json``)."""
    confusion = confusion_matrix(scores.predictions, scores.labels, len(classes))
    totals = confusion.sum(1)
    per_class = {c: int(confusion[i, i]) / int(totals[i]) if totals[i] else None for i, c in enumerate(classes)}
    return {"top1": scores.top1, "n": len(scores.labels), "loss": scores.loss,
            "per_class": per_class, "confusion": confusion.tolist()}
