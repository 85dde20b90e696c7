"""``cnnlab evaluate``: score a run or checkpoint on the test set it reported on.

Writes ``eval/metrics.json`` (top-1, loss, per-class accuracy, confusion matrix; see
:func:`cnnlab.core.metrics.breakdown`; per-class precision, recall and F1, top-5, a bootstrap interval
on top-1 and the calibration figures; see :func:`cnnlab.core.calibration.assess`),
``eval/reliability.png`` and ``eval/confusion.png``; above ``DENSE_CONFUSION_CLASSES`` classes the
matrix is kept as its nonzero cells and not drawn, which a note says. ``calibrate`` first fits a
temperature on the run's validation images and keeps it in the run (:func:`cnnlab.run.save_calibration`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from cnnlab import run
from cnnlab.core.calibration import assess, fit_temperature
from cnnlab.core.device import pick_device
from cnnlab.core.errors import one_line
from cnnlab.core.files import atomic_write
from cnnlab.core.metrics import DENSE_CONFUSION_CLASSES, breakdown, score

log = logging.getLogger(__name__)

# The side of the confusion figure grows with the classes up to this (7,200 px at 120 dpi; about 105 classes).
MAX_FIGURE_INCHES = 60


def evaluate(path: str | Path, dataset: str | None = None, data_dir: str | None = None,
             limit_test: int | None = None, device: str = "auto", out: str | Path | None = None,
             tta: bool | str | None = None, calibrate: bool = False) -> dict[str, Any]:
    """Score a run folder or checkpoint on its test set; write JSON, a reliability diagram and a
    confusion-matrix PNG.

    ``tta``: average each image's logits with its mirror image's, or ``"translate"``: over airbench's six
    views (see :func:`score`); by default as the run scored itself, so that the number it reported is the
    number found again. ``calibrate``: fit the temperature on the run's validation images first and keep it
    in the run (``fitted`` in the result); otherwise the temperature already kept for this checkpoint, if
    any, is the one reported.
    """
    loaded = run.load(path, device=pick_device(device))
    tta = loaded.tta if tta is None else tta
    fitted = _calibrate(loaded, data_dir, tta) if calibrate else None
    x, y = loaded.test_set(dataset, data_dir, limit_test)
    scores = score(loaded.model, x.to(loaded.device), y.to(loaded.device), loaded.preprocess, tta=tta)
    result = breakdown(scores, loaded.classes)
    assert scores.logits is not None
    result.update(assess(scores.logits, scores.labels, loaded.classes, loaded.temperature))
    result["fitted"] = fitted
    result["tta"] = tta
    result["checkpoint"] = str(loaded.path)
    result["dataset"] = dataset or loaded.config.dataset  # test_set refuses a run that does not say

    out_dir = Path(out) if out else (loaded.run_dir or loaded.path.parent) / "eval"
    atomic_write(out_dir / "metrics.json", json.dumps(result, indent=2))
    fig = reliability_figure(result)
    atomic_write(out_dir / "reliability.png", lambda f: fig.savefig(f, format="png"))
    result["outputs"] = [str(out_dir / "metrics.json"), str(out_dir / "reliability.png")]
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


def _calibrate(loaded: run.LoadedRun, data_dir: str | None, tta: bool | str) -> dict[str, Any]:
    """Fit the temperature on the run's validation images (scored with ``tta`` as the test set is) and
    keep it in the run folder; what was fitted, with the validation NLL before and after."""
    run.calibration_file(loaded)  # a checkpoint outside a run folder is refused before any image is read
    x, y = loaded.validation_set(data_dir)
    val = score(loaded.model, x.to(loaded.device), y.to(loaded.device), loaded.preprocess, tta=tta)
    assert val.logits is not None
    t = fit_temperature(val.logits, val.labels)
    z = val.logits.double()
    fitted = {"temperature": t, "validation_images": len(y), "tta": tta,
              "nll_before": float(torch.nn.functional.cross_entropy(z, val.labels)),
              "nll_after": float(torch.nn.functional.cross_entropy(z / t, val.labels))}
    fitted["file"] = str(run.save_calibration(loaded, **fitted))
    return fitted


def reliability_figure(result: dict[str, Any]) -> Figure:
    """The reliability diagram of :func:`cnnlab.core.calibration.assess`'s result: each confidence bin's
    accuracy against the diagonal a calibrated model would follow (and after the temperature, when one
    is kept), above the number of test images in each bin."""
    fig = Figure(figsize=(6, 6.5), dpi=120)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="calibrated")
    shown = [("softmax", result["calibration"], "tab:blue")]
    if result.get("calibrated"):
        shown.append((f"temperature {result['temperature']:.2f}", result["calibrated"], "tab:orange"))
    width = 1 / len(result["calibration"]["bins"])
    for n, (name, figures, color) in enumerate(shown):
        bins = [b for b in figures["bins"] if b["count"]]
        offset = (n - (len(shown) - 1) / 2) * width / len(shown)
        centres = [(b["lower"] + b["upper"]) / 2 + offset for b in bins]
        top.bar(centres, [b["accuracy"] for b in bins], width=width / len(shown), color=color, alpha=0.75,
                edgecolor="black", linewidth=0.5, label=f"{name}: ECE {100 * figures['ece']:.1f}%")
        bottom.bar(centres, [b["count"] for b in bins], width=width / len(shown), color=color, alpha=0.75)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy in the bin")
    top.set_title(f"Reliability on {result['n']} test images ({len(result['calibration']['bins'])} bins)")
    top.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("images")
    fig.tight_layout()
    return fig


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
        names = [one_line(c) for c in classes]  # a folder name's control characters have no glyph
        ax.set_xticks(range(k), names, rotation=45, ha="right")
        ax.set_yticks(range(k), names)
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
