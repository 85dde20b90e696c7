"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks", §3.3).

A copy of the model is trained for a few hundred steps at most, with the learning rate growing
exponentially from ``start_lr`` to ``end_lr``, on the run's own data, augmentation, optimizer and
batch size; the sweep stops once the smoothed loss diverges. The curve of smoothed loss against the
rate is what to read: the automatic suggestions below (those of fastai's ``lr_find`` and Lightning's
``LearningRateFinder``) are known to be unreliable (Lightning issues #1767 and #21141). Nothing is
written to a run folder: no checkpoint, no metrics.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cnnlab.config import TrainConfig
from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write
from cnnlab.train import distributed
from cnnlab.train.engine import Trainer, prepare

BETA = 0.98  # the loss's exponential smoothing, as fastai and Lightning have it
MAX_STEPS = 1000
CAVEAT = ("the automatic suggestion is known to be unreliable (Lightning issues #1767, #21141): read the curve, "
          "and pick a rate where the loss still falls steeply, well before its minimum")


@dataclass
class LRFind:
    """A learning-rate sweep: the rate of every step taken, its loss and the smoothed loss, and the two
    suggestions (``None`` when the curve is too short to suggest anything)."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    start_lr: float
    end_lr: float
    steps: int  # asked for; ``len(lrs)`` were taken
    diverged: bool  # whether the sweep stopped early because the loss diverged
    steepest: float | None  # the rate where the smoothed loss falls fastest against log(rate)
    valley: float | None  # fastai's valley: half-way down the longest descent of the smoothed loss
    recipe_lr: float  # the ``lr`` of the configuration swept, to compare with

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_find(cfg: TrainConfig, steps: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0,
            diverge: float = 4.0, model: nn.Module | None = None) -> LRFind:
    """Sweep the learning rate exponentially from ``start_lr`` to ``end_lr`` over ``steps`` SGD steps of
    ``cfg``'s training (on a copy of ``model``, else of the model ``cfg`` builds), stopping early once the
    smoothed loss exceeds ``diverge`` × its lowest value or the loss is no longer finite."""
    _check(steps, start_lr, end_lr, diverge)
    # A constant schedule at the sweep's rate; a weight average would not change the loss being read.
    sweep = dataclasses.replace(cfg, schedule="constant", lr=start_lr, ema=0.0, epochs=1)
    setup = prepare(sweep, distributed.SINGLE, Path(cfg.out or "."))  # the run folder is never written
    if model is not None:
        setup.model = copy.deepcopy(model)
    trainer = Trainer(setup)
    ratio = end_lr / start_lr
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer, lambda i: ratio ** (i / max(steps - 1, 1)))
    lrs, losses, smoothed = _sweep(trainer, steps, diverge)
    steepest, valley = suggestions(lrs, smoothed, steps)
    return LRFind(lrs, losses, smoothed, start_lr, end_lr, steps, len(lrs) < steps, steepest, valley, cfg.lr)


def _check(steps: int, start_lr: float, end_lr: float, diverge: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= MAX_STEPS:
        raise UserError(f"`steps` must be a whole number between 2 and {MAX_STEPS} (got {steps!r})")
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise UserError(f"`{name}` must be a finite number greater than 0 (got {value!r})")
    if end_lr <= start_lr:
        raise UserError(f"`end_lr` ({end_lr:g}) must be greater than `start_lr` ({start_lr:g})")
    if not diverge > 1:
        raise UserError(f"`diverge` must be greater than 1 (got {diverge!r})")


def _sweep(t: Trainer, steps: int, diverge: float) -> tuple[list[float], list[float], list[float]]:
    """Train ``steps`` steps (over as many epochs of batches as that takes); the rate, loss and smoothed loss
    of each step up to the one where the smoothed loss diverged (included: it shows the rise)."""
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    average, best = 0.0, math.inf
    t.model.train()
    epoch = 0
    while len(lrs) < steps:
        for x, y, n in t.batches.epoch(epoch, 0):
            stats = t.step(x, y, n, len(lrs) + 1)
            loss = stats.loss_sum.item() / stats.size
            if not math.isfinite(loss):
                return lrs, losses, smoothed
            average = BETA * average + (1 - BETA) * loss
            smooth = average / (1 - BETA ** (len(lrs) + 1))  # bias-corrected, as in Adam
            lrs.append(stats.lr)
            losses.append(loss)
            smoothed.append(smooth)
            best = min(best, smooth)
            if smooth > diverge * best or len(lrs) == steps:
                return lrs, losses, smoothed
        epoch += 1
    return lrs, losses, smoothed


def suggestions(lrs: list[float], smoothed: list[float], steps: int) -> tuple[float | None, float | None]:
    """The steepest descent and the valley of the curve, on the window fastai reads them from: without the
    first tenth of the planned steps (the smoothing still warming up) and the last 5 (the divergence).

    Steepest (Lightning's ``suggestion``): the rate at the most negative ``np.gradient`` of the smoothed loss
    against log10(rate). Valley (fastai's ``valley``, fastai 2.5 ``callback/schedule.py``): the longest
    strictly decreasing run of losses (a longest decreasing subsequence), and the rate half-way along it
    (fastai: start + ⌊span/3⌋ + ⌊span/6⌋).
    """
    lo, hi = steps // 10, len(lrs) - 5
    if hi - lo < 3:  # too short a curve to trim: read all of it
        lo, hi = 0, len(lrs)
    if hi - lo < 3:
        return None, None
    x, y = np.log10(np.array(lrs[lo:hi])), np.array(smoothed[lo:hi])
    steepest = float(lrs[lo + int(np.argmin(np.gradient(y, x)))])
    return steepest, float(lrs[lo + _valley(y)])


def _valley(losses: np.ndarray) -> int:
    """fastai's ``valley``: the index half-way along the longest decreasing subsequence of ``losses``."""
    n = len(losses)
    longest = [1] * n  # longest[i]: the longest decreasing subsequence ending at i
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[end] < longest[i]:
            end, start = i, i - longest[i]
    span = (end - start) / 3
    return max(start + int(span) + int(span / 2), 0)


def plot(result: LRFind, out: str | Path) -> Path:
    """The smoothed loss against the rate on a log axis, with the suggestions and the recipe's rate marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)  # not pyplot: no global state
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="0.8", linewidth=0.8, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", label="smoothed loss")
    ax.set_xscale("log")
    marks = (("steepest", result.steepest, "C1", "o"), ("valley", result.valley, "C2", "s"))
    for name, lr, color, marker in marks:
        if lr is not None:
            y = result.smoothed[result.lrs.index(lr)]
            ax.plot([lr], [y], marker=marker, color=color, linestyle="none", label=f"{name} {lr:.2g}")
    ax.axvline(result.recipe_lr, color="0.4", linestyle="--", linewidth=1, label=f"configured lr {result.recipe_lr:g}")
    # Up to half again the starting loss: the divergence at the end would flatten the rest of the curve.
    low, high = min(result.smoothed), min(max(result.smoothed), 1.5 * result.smoothed[0])
    ax.set_ylim(low - 0.05 * (high - low) - 1e-6, high + 0.05 * (high - low) + 1e-6)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    end = "diverged" if result.diverged else "all steps"
    ax.set_title(f"learning-rate range test: {len(result.lrs)} steps ({end})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out)
    if path.is_dir():
        raise UserError(f"`out` {path} is a folder; give a file name for the plot (e.g. {path / 'lr-find.png'})")
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path
