"""The report's plots, drawn with matplotlib and handed back as ``data:`` URIs of PNGs.

Every plot has a title, labelled axes and units, so that it reads without the text around it.
Matplotlib's math mode is switched off while the report is drawn (:func:`plain_text`), so a class
named ``a$b$`` is shown as written instead of being parsed as TeX.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from cnnlab.evaluate import confusion_figure, reliability_figure

__all__ = ["confusion", "epoch_curves", "plain_text", "png_uri", "step_curves", "thumbnail"]

DPI = 110
# The assignment's reported result (seed recipe, 20 epochs, full CIFAR-10 at 224 px on a GPU).
ASSIGNMENT_TRAIN, ASSIGNMENT_TEST = 0.99, 0.88


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fig_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return png_uri(buffer.getvalue())


@contextmanager
def plain_text() -> Iterator[None]:
    """Text in figures is drawn literally: no mathtext for ``$…$`` in user-provided names."""
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        yield


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; the first points average what there is so far."""
    if window <= 1 or len(values) < 3:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    for i in range(len(values)):
        lo = max(0, i + 1 - window)
        out[i] = (sums[i + 1] - sums[lo]) / (i + 1 - lo)
    return out


def step_curves(steps: Sequence[dict[str, Any]], epochs: Sequence[dict[str, Any]]) -> str:
    """Training loss, accuracy and learning rate at every step (raw, and a moving average)."""
    x = np.array([r["step"] for r in steps], dtype=float)
    window = max(1, len(x) // 40)
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    panels = [("loss", 1.0, "cross-entropy loss", "training loss per step"),
              ("acc", 100.0, "accuracy (%)", "training accuracy per step (batch)"),
              ("lr", 1.0, "learning rate", "learning rate per step")]
    for ax, (key, scale, ylabel, title) in zip(axes, panels):
        y = np.array([r.get(key, np.nan) for r in steps], dtype=float) * scale
        if key == "lr":
            ax.plot(x, y, color="tab:green", lw=1.2)
        elif window > 1:
            ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8, label="each step")
            ax.plot(x, _smooth(y, window), color="tab:blue", lw=1.6, label=f"mean of the last {window} steps")
            ax.legend(fontsize=8, loc="best")
        else:
            ax.plot(x, y, color="tab:blue", lw=1.2)
        for r in epochs[:-1]:  # epoch boundaries
            ax.axvline(r["step"], color="0.6", ls=":", lw=0.9, zorder=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step (optimizer update)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if len(epochs) > 1:
        fig.text(0.99, 0.01, "dotted lines: ends of epochs", ha="right", va="bottom", fontsize=7, color="0.4")
    fig.tight_layout()
    return _fig_uri(fig)


def epoch_curves(epochs: Sequence[dict[str, Any]]) -> str:
    """Train, validation and test loss and accuracy after every epoch, with the assignment's result."""
    x = [r["epoch"] for r in epochs]
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 2)
    series = [("train", "tab:blue"), ("val", "tab:orange"), ("test", "tab:red")]
    for ax, (suffix, scale, ylabel, title) in zip(axes, [
            ("loss", 1.0, "cross-entropy loss", "loss after each epoch"),
            ("acc", 100.0, "accuracy (%)", "accuracy after each epoch")]):
        for name, color in series:
            values = [r.get(f"{name}_{suffix}") for r in epochs]
            if all(v is None for v in values):
                continue
            y = [np.nan if v is None else v * scale for v in values]
            label = {"train": "train (running mean over the epoch)", "val": "validation", "test": "test"}[name]
            ax.plot(x, y, marker="o", ms=4, color=color, label=label)
        if suffix == "acc":
            ax.axhline(100 * ASSIGNMENT_TRAIN, color="tab:blue", ls="--", lw=0.9, alpha=0.7)
            ax.axhline(100 * ASSIGNMENT_TEST, color="tab:red", ls="--", lw=0.9, alpha=0.7)
            ax.text(x[0], 100 * ASSIGNMENT_TRAIN, " assignment: train 99%", va="bottom", fontsize=7, color="tab:blue")
            ax.text(x[0], 100 * ASSIGNMENT_TEST, " assignment: test 88%", va="bottom", fontsize=7, color="tab:red")
            ax.set_ylim(0, 105)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        if len(x) <= 20:
            ax.set_xticks(x)
    fig.tight_layout()
    return _fig_uri(fig)


def confusion(result: dict[str, Any], classes: list[str]) -> str:
    """The confusion matrix exactly as ``cnnlab evaluate`` draws it."""
    buffer = io.BytesIO()
    confusion_figure(result, classes).savefig(buffer, format="png")
    return png_uri(buffer.getvalue())


def reliability(result: dict[str, Any]) -> str:
    """The reliability diagram exactly as ``cnnlab evaluate`` draws it."""
    buffer = io.BytesIO()
    reliability_figure(result).savefig(buffer, format="png")
    return png_uri(buffer.getvalue())


def thumbnail(pixels: torch.Tensor, most: int = 96) -> str:
    """A uint8 (C, H, W) image as a PNG ``data:`` URI, shrunk to at most ``most`` pixels a side."""
    a = pixels.detach().cpu().numpy()
    img = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    if max(img.size) > most:
        img.thumbnail((most, most))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return png_uri(buffer.getvalue())
