"""``cnnlab evaluate``: score a run or checkpoint on the test set it reported on.

Writes ``eval/metrics.json`` (top-1, loss, per-class accuracy, confusion matrix; see
:func:`cnnlab.core.metrics.breakdown`) and ``eval/confusion.png``; above ``DENSE_CONFUSION_CLASSES``
classes the matrix is kept as its nonzero cells and not drawn, which a note says.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from cnnlab import run
from cnnlab.core.device import pick_device
from cnnlab.core.files import atomic_write
from cnnlab.core.metrics import DENSE_CONFUSION_CLASSES, breakdown, score

log = logging.getLogger(__name__)

# The side of the confusion figure grows with the classes up to this (7,200 px at 120 dpi; about 105 classes).
MAX_FIGURE_INCHES = 60


def evaluate(path: str | Path, dataset: str | None = None, data_dir: str | None = None,
             limit_test: int | None = None, device: str = "auto", out: str | Path | None = None,
             tta: bool | None = None) -> dict[str, Any]:
    """Score a run folder or checkpoint on its test set; write JSON and a confusion-matrix PNG.

    ``tta``: average each image's logits with its mirror image's (see :func:`score`); by default as
    the run scored itself, so that the number it reported is the number found again.
    """
    loaded = run.load(path, device=pick_device(device))
    x, y = loaded.test_set(dataset, data_dir, limit_test)
    tta = loaded.tta if tta is None else tta
    scores = score(loaded.model, x.to(loaded.device), y.to(loaded.device), loaded.preprocess, tta=tta)
    result = breakdown(scores, loaded.classes)
    result["tta"] = tta
    result["checkpoint"] = str(loaded.path)
    result["dataset"] = dataset or loaded.config.dataset  # test_set refuses a run that does not say

    out_dir = Path(out) if out else (loaded.run_dir or loaded.path.parent) / "eval"
    atomic_write(out_dir / "metrics.json", json.dumps(result, indent=2))
    result["outputs"] = [str(out_dir / "metrics.json")]
    if result["confusion"] is None:
        k = len(loaded.classes)
        log.warning(f"the confusion matrix of {k} classes is in {out_dir / 'metrics.json'} as its nonzero cells "
                    f"(confusion_cells: [true, predicted, count]) and is not drawn: a dense one would have {k}² "
                    f"cells (it is kept dense up to {DENSE_CONFUSION_CLASSES} classes)")
        return result
    fig = confusion_figure(result, loaded.classes)
    atomic_write(out_dir / "confusion.png", lambda f: fig.savefig(f, format="png"))
    result["outputs"].append(str(out_dir / "confusion.png"))
    return result


def confusion_figure(result: dict[str, Any], classes: list[str]) -> Figure:
    """Row-normalised confusion matrix with counts, readable for up to a few dozen classes; beyond about a
    hundred, a picture of at most MAX_FIGURE_INCHES a side, its classes numbered instead of named."""
    counts = torch.tensor(result["confusion"], dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    k = len(classes)
    named = 0.55 * k + 2 <= MAX_FIGURE_INCHES  # room for each class's name
    size = max(5.0, min(0.55 * k + 2, MAX_FIGURE_INCHES))
    # A plain Figure, not pyplot: no global state, so it is safe in threads and needs no backend.
    fig = Figure(figsize=(size + 1, size), dpi=120)
    ax = fig.subplots()
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if named:
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class" if named else "predicted class (number)")
    ax.set_ylabel("true class" if named else "true class (number)")
    ax.set_title(f"Confusion matrix — top-1 {100 * result['top1']:.1f}% on {result['n']} test images")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    return fig
