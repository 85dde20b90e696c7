"""``cnnlab report``: one self-contained HTML page about a run folder.

What was trained and how long it took, the final accuracies beside the assignment's, Table 1 with
counted parameters and MACs, the training curves, per-class accuracy, the confusion matrix, the
most-confused pairs and a grid of mistakes, and pictures of what the network learned (first-layer
filters, feature maps, Grad-CAM, class models). Images are inlined, so the file opens from disk
with no server and no network.
"""

from __future__ import annotations

from pathlib import Path

from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write
from cnnlab.report.group import group_page
from cnnlab.report.page import render
from cnnlab.report.sections import gather
from cnnlab.train import tracking
from cnnlab.train.seeds import is_group

__all__ = ["report"]


def report(run_dir: str | Path, out: str | Path | None = None, device: str = "auto") -> Path:
    """Write the report of ``run_dir`` (a run, or a group of seeds) to ``out`` (default
    ``RUN_DIR/report.html``), creating its folder if need be; returns its path. A run that logs to MLflow
    gets the page as an artifact of its MLflow run too."""
    run_dir = Path(run_dir)
    target = Path(out) if out else run_dir / "report.html"
    if target.is_dir():
        raise UserError(f"`out` {target} is a folder; give a file name such as {target / 'report.html'}")
    page = group_page(run_dir) if is_group(run_dir) else render(gather(run_dir, device=device))
    try:
        atomic_write(target, page)
    except OSError as err:  # a folder that cannot be made (under /proc, a file in the way), no space, no rights
        raise UserError(f"cannot write `out` {target}: {err.strerror or err}; choose another file") from None
    tracking.log_report(run_dir, target)  # when the run logs to MLflow
    return target
