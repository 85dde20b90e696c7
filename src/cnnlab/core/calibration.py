"""How far to believe a classifier's probabilities, and the figures beyond top-1 accuracy.

Calibration (Guo et al. 2017, "On Calibration of Modern Neural Networks"): the expected and maximum
calibration error over equal-width confidence bins (torchmetrics' ``multiclass_calibration_error``,
L1 and max norms), the negative log-likelihood, the Brier score, and the reliability diagram's bins.
Temperature scaling divides the logits by one scalar T fitted to minimise the NLL of held-out images;
it never changes which class is predicted, only how sure the model says it is.

Classification: per-class precision, recall and F1, top-k accuracy (torchmetrics), and a percentile
bootstrap interval on top-1 accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

from cnnlab.core.errors import UserError

__all__ = ["BINS", "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "TOP_K", "assess", "bootstrap_interval", "calibration",
           "classification", "fit_temperature", "reliability"]

BINS = 15  # equal-width confidence bins, as in Guo et al.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0  # fixed: the same test set always gets the same interval
TOP_K = 5  # top-k accuracy is reported when there are more classes than this
# Temperatures searched: far beyond any a trained network needs (Guo et al. find 1–3), and a bound keeps a
# degenerate set (every image right with any T) from sending T to 0.
LEAST_TEMPERATURE, MOST_TEMPERATURE = 0.01, 100.0


def reliability(probabilities: Tensor, labels: Tensor, bins: int = BINS) -> list[dict[str, Any]]:
    """The reliability diagram's bins: for each of ``bins`` equal-width confidence intervals, its
    bounds, how many predictions fall in it, their accuracy and their mean confidence (None when empty).

    A confidence on a boundary goes to the bin above it, as torchmetrics bins (so that the weighted
    gaps of these bins are its ECE).
    """
    confidence, predicted = probabilities.double().max(1)
    right = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, bins - 1)
    count = torch.bincount(which, minlength=bins)
    hits = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, right)
    sure = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, confidence)
    return [{"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(count[b]),
             "accuracy": float(hits[b] / count[b]) if count[b] else None,
             "confidence": float(sure[b] / count[b]) if count[b] else None} for b in range(bins)]


def calibration(logits: Tensor, labels: Tensor, temperature: float = 1.0, bins: int = BINS) -> dict[str, Any]:
    """ECE and MCE (``bins`` equal-width bins), NLL, Brier score and the reliability bins of the
    softmax of ``logits`` / ``temperature`` against ``labels``.

    The Brier score is the multi-class one: the mean over images of the squared distance between the
    probability vector and the one-hot label (0 is perfect, 2 the worst).
    """
    z = logits.double() / temperature
    probabilities = z.softmax(1)
    k = probabilities.shape[1]
    onehot = F.one_hot(labels, k).double()
    return {
        "ece": float(multiclass_calibration_error(probabilities, labels, k, n_bins=bins, norm="l1")),
        "mce": float(multiclass_calibration_error(probabilities, labels, k, n_bins=bins, norm="max")),
        "nll": float(F.cross_entropy(z, labels)),
        "brier": float(((probabilities - onehot) ** 2).sum(1).mean()),
        "bins": reliability(probabilities, labels, bins),
    }


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The temperature T that minimises the NLL of softmax(``logits`` / T) on ``labels``.

    L-BFGS (strong Wolfe line search) on log T, as in Guo et al.'s reference code: log T keeps T positive
    without a constraint. The NLL is convex in 1/T, so the one minimum is found from T = 1; the result is
    kept within [LEAST_TEMPERATURE, MOST_TEMPERATURE].
    """
    if len(labels) == 0:
        raise UserError("temperature scaling needs validation images, and the run held out none "
                        "(train with `val_split` above 0)")
    z = logits.detach().double().cpu()
    y = labels.cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimiser.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        t = MOST_TEMPERATURE
    return min(max(t, LEAST_TEMPERATURE), MOST_TEMPERATURE)


def bootstrap_interval(right: Tensor, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The percentile bootstrap interval at ``level`` of the mean of ``right`` (1 for an image classified
    correctly, 0 otherwise): ``resamples`` draws of as many images with replacement, from a seeded
    generator, so that the same test set always gets the same interval."""
    n = len(right)
    if n == 0:
        return (0.0, 0.0)
    g = torch.Generator().manual_seed(seed)
    values = right.double().cpu()
    means = torch.stack([values[torch.randint(n, (n,), generator=g)].mean() for _ in range(resamples)])
    tail = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return (lo, hi)


def classification(logits: Tensor, labels: Tensor, classes: list[str]) -> dict[str, Any]:
    """Per-class precision, recall and F1 (0 for a class with nothing to divide by, as scikit-learn and
    torchmetrics count it: never predicted, or with no test image), top-5 accuracy when there are more
    than 5 classes (else None) and the 95% bootstrap interval on top-1.

    Precision, recall and F1 are counted here from three bincounts rather than by torchmetrics, whose
    ``multiclass_precision`` builds the dense classes² confusion matrix (80 GB for 100,000 classes);
    the tests hold them equal to torchmetrics'.
    """
    k = len(classes)
    z = logits.float()
    predicted = z.argmax(1)
    right = predicted == labels
    hits = torch.bincount(labels[right], minlength=k).double()
    said, truly = torch.bincount(predicted, minlength=k).double(), torch.bincount(labels, minlength=k).double()
    precision = torch.where(said > 0, hits / said.clamp(min=1), 0.0)
    recall = torch.where(truly > 0, hits / truly.clamp(min=1), 0.0)
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.clamp(min=1e-300), 0.0)
    figures = {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist()}
    per_class = {c: {name: v[i] for name, v in figures.items()} for i, c in enumerate(classes)}
    top5 = float(multiclass_accuracy(z, labels, k, top_k=TOP_K, average="micro")) if k > TOP_K else None
    return {"per_class_figures": per_class, "top5": top5, "top1_interval": list(bootstrap_interval(right))}


def assess(logits: Tensor, labels: Tensor, classes: list[str], temperature: float | None = None) -> dict[str, Any]:
    """Everything beyond top-1 that ``cnnlab evaluate`` prints and the report shows, as plain values:
    :func:`classification`'s figures, ``calibration`` of the plain softmax, ``temperature`` (None when
    none is given) and ``calibrated``, the same calibration figures after dividing by it (else None)."""
    result = classification(logits, labels, classes)
    result["calibration"] = calibration(logits, labels)
    result["temperature"] = temperature
    result["calibrated"] = calibration(logits, labels, temperature) if temperature is not None else None
    return result
