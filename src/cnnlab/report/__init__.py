"""``cnnlab report``: one self-contained HTML page about a run folder.

What was trained and how long it took, the final accuracies beside the assignment's, Table 1 with
counted parameters and MACs, the training curves, per-class accuracy, the confusion matrix, the
most-confused pairs and a grid of mistakes, and pictures of what the network learned (conv1
filters, feature maps, Grad-CAM, class models). Images are inlined, so the file opens from disk
with no server and no network.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["report"]


def report(run_dir: str | Path, out: str | Path | None = None, device: str = "auto") -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``); returns its path."""
    from cnnlab.core.errors import UserError
    from cnnlab.report.page import render
    from cnnlab.report.sections import gather

    run_dir = Path(run_dir)
    target = Path(out) if out else run_dir / "report.html"
    if target.is_dir():
        raise UserError(f"--out {target} is a folder; give a file name such as {target / 'report.html'}")
    text = render(gather(run_dir, device=device))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
