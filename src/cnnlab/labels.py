"""``cnnlab labels``: the run's training images whose label is likely wrong (confident learning).

A command of its own rather than part of ``cnnlab evaluate``: evaluate scores the test set in seconds,
while this examines the training data and, with ``folds``, trains K copies of the run (minutes to hours);
keeping them apart keeps that cost out of evaluate and its ``metrics.json`` as it was. The result goes to
``RUN_DIR/label_issues.json`` (see :mod:`cnnlab.inspect.labels`), where the report and the explorer read
it; nothing else in the run folder is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnlab import run
from cnnlab.core.device import pick_device
from cnnlab.core.errors import UserError
from cnnlab.inspect import Inspection
from cnnlab.inspect import labels as confident

__all__ = ["labels"]


def labels(path: str | Path, folds: int | None = None, device: str = "auto",
           data_dir: str | None = None) -> dict[str, Any]:
    """Find the run folder ``path``'s likely label errors: on its validation split, or with ``folds`` K by
    K-fold cross-validation on its training split. Writes ``RUN_DIR/label_issues.json`` and returns what it
    holds, with ``file`` its path."""
    loaded = run.load(path, device=pick_device(device))
    if loaded.run_dir is None:
        raise UserError(f"{path} is not a run folder (nor a checkpoint in one's checkpoints/); cnnlab labels "
                        "writes label_issues.json into the run folder, so give the run folder")
    result = Inspection(loaded, data_dir).label_issues(folds)
    file = confident.keep(loaded, result)
    return {**result.to_json(), "file": str(file)}
