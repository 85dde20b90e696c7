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

# The most classes whose confusion matrix is kept dense: 10^6 cells (ImageNet's 1000 classes).
DENSE_CONFUSION_CLASSES = 1000


@dataclass
class Scores:
    loss: float
    top1: float
    predictions: torch.Tensor  # int64 (N,) on the CPU
    labels: torch.Tensor
    confidence: torch.Tensor | None = None  # float (N,) on the CPU: the softmax probability of each prediction
    probabilities: torch.Tensor | None = None  # float (N, classes) on the CPU: the softmax of each image's logits
    logits: torch.Tensor | None = None  # float (N, classes) on the CPU: as the model gave them (with TTA, averaged)
    features: torch.Tensor | None = None  # float (N, D) on the CPU: the input of `score`'s `features` module


def logits(model: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """float32 logits of ``model`` for inputs ``x``; with ``tta``, averaged with those of the mirror images."""
    out = model(x).float()
    return (out + model(x.flip(-1)).float()) / 2 if tta else out


@torch.no_grad()
def score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, preprocess: Preprocess, *,
          batch_size: int = 256, amp: bool = False, channels_last: bool = False, tta: bool = False,
          temperature: float | None = None, features: nn.Module | None = None) -> Scores:
    """Mean cross-entropy and top-1 accuracy of ``model`` (put in eval mode) on uint8 ``images``.

    ``tta``: test-time flip augmentation, the logits of each image averaged with those of its mirror
    image (a free gain for models trained with flips; twice the forward passes). ``temperature``: the
    probabilities (not the loss, not the predictions) are the softmax of the logits divided by it.
    ``features``: a module of ``model`` whose input is recorded for every image in the same pass, flattened
    and, with ``tta``, averaged over the two passes as the logits are (for the last linear layer, its
    output on these features is then the logits).
    """
    was_training = model.training
    model.eval()
    device = images.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    loss_sum = torch.zeros((), device=device)
    preds, probabilities, raw, recorded = [], [], [], []
    taken: list[torch.Tensor] = []
    hook = None if features is None else features.register_forward_pre_hook(
        lambda module, args: taken.append(args[0].detach().flatten(1).float()))
    try:
        for i in range(0, len(labels), batch_size):
            x, y = preprocess.to_input(images[i:i + batch_size], channels_last), labels[i:i + batch_size]
            with autocast:
                out = logits(model, x, tta)
            if taken:
                recorded.append(torch.stack(taken).mean(0).cpu())
                taken.clear()
            loss_sum += F.cross_entropy(out, y, reduction="sum")
            preds.append(out.argmax(1))
            raw.append(out.float())
            probabilities.append((out.float() / (temperature or 1.0)).softmax(1))
    finally:
        if hook is not None:
            hook.remove()
    model.train(was_training)
    predictions = torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)
    n = max(len(labels), 1)
    y = labels.cpu()
    probs = torch.cat(probabilities).cpu() if probabilities else torch.zeros(0, 0)
    return Scores(loss_sum.item() / n, (predictions == y).sum().item() / n, predictions, y,
                  probs.amax(1) if probabilities else torch.zeros(0), probs,
                  torch.cat(raw).cpu() if raw else torch.zeros(0, 0), torch.cat(recorded) if recorded else None)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Row = true class, column = predicted class."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def confusion_cells(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    """The cells of the confusion matrix that are not 0, as ``[true, predicted, count]``, row by row: at most
    one per test image, however many classes there are."""
    flat, counts = torch.unique(labels * num_classes + predictions, return_counts=True)
    return [[cell // num_classes, cell % num_classes, count] for cell, count in zip(flat.tolist(), counts.tolist())]


def breakdown(scores: Scores, classes: list[str]) -> dict[str, Any]:
    """Top-1, loss, per-class accuracy and the confusion matrix as plain values (``evaluate --json``).

    The matrix is dense (``confusion``) up to ``DENSE_CONFUSION_CLASSES`` classes; above, where its
    classes² cells would outgrow any test set (100,000 classes: 80 GB), ``confusion`` is None and
    ``confusion_cells`` holds the cells that are not 0 (:func:`confusion_cells`).
    """
    k, labels, predictions = len(classes), scores.labels, scores.predictions
    totals = torch.bincount(labels, minlength=k).tolist()
    hits = torch.bincount(labels[predictions == labels], minlength=k).tolist()
    per_class = {c: hits[i] / totals[i] if totals[i] else None for i, c in enumerate(classes)}
    result: dict[str, Any] = {"top1": scores.top1, "n": len(labels), "loss": scores.loss, "per_class": per_class,
                              "confusion": None}
    if k <= DENSE_CONFUSION_CLASSES:
        result["confusion"] = confusion_matrix(predictions, labels, k).tolist()
    else:
        result["confusion_cells"] = confusion_cells(predictions, labels, k)
    return result
