"""Bad labels: confident learning (Northcutt, Jiang & Chuang 2021) on out-of-sample probabilities.

A model's probabilities for the images it trained on say little about their labels (it has learned
them, wrong ones included), so the probabilities examined here are always out of sample:

- **validation** (the default): the run's model on its validation split, which training held out;
- **cross-validation** (``folds`` K): the run's training split cut into K folds (stratified by label,
  seeded), K copies of the run's own configuration trained through :func:`cnnlab.train.engine.train`,
  each on K − 1 folds, and each fold scored by the copy that did not see it. It costs about K − 1 times
  the run's training; the copies live in a temporary folder, removed afterwards.

The candidates are cleanlab's ``find_label_issues`` (``prune_by_noise_rate``, ranked by self-confidence:
the probability of the given label). :func:`confident_joint` is the count the method starts from, written
here from its definition (tested against cleanlab's ``compute_confident_joint``) and kept in the result:
how many images given label i are confidently of class j. What ``cnnlab labels`` found is kept in
``RUN_DIR/label_issues.json``, stamped with the checkpoint, so that the report and the explorer show the
same candidates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cnnlab import run as runs
from cnnlab.core.errors import Interrupted, UserError
from cnnlab.core.files import atomic_write
from cnnlab.core.metrics import score
from cnnlab.data.splits import Splits
from cnnlab.data.store import PixelStore, take
from cnnlab.inspect.results import LabelIssues
from cnnlab.train.engine import train

__all__ = ["LABEL_ISSUES_FILE", "confident_joint", "cross_validated", "find", "folds_of", "keep", "kept",
           "on_validation"]

log = logging.getLogger(__name__)

LABEL_ISSUES_FILE = "label_issues.json"
FOLD_SEED = 20211025  # fixed, so that the same run is always cut into the same folds
Progress = Callable[[float], None]


def confident_joint(labels: Tensor, probabilities: Tensor) -> Tensor:
    """The confident joint C (Northcutt et al. 2021, Eq. 1, before calibration): C[i, j] counts the images
    given label i whose probability of class j reaches t_j, the mean probability of class j over the images
    given label j (of several such classes, the likeliest; images reaching none are not counted). Each
    diagonal cell is at least 1, as cleanlab keeps it."""
    n, k = probabilities.shape
    counts = torch.bincount(labels, minlength=k)
    own = probabilities[torch.arange(n), labels]
    sums = torch.zeros(k, dtype=probabilities.dtype).index_add_(0, labels, own)
    # A class nobody is given gets a threshold no probability reaches; the rest at least cleanlab's floor.
    thresholds = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, 2.0)).clamp(min=2e-6)
    confident = probabilities >= thresholds - 1e-6
    reached = confident.sum(1)
    guess = torch.where(reached > 1, probabilities.argmax(1), confident.int().argmax(1))
    counted = reached > 0
    joint = torch.bincount(labels[counted] * k + guess[counted], minlength=k * k).view(k, k)
    joint.diagonal().clamp_(min=1)
    return joint


def find(labels: Tensor, probabilities: Tensor) -> Tensor:
    """Positions of the images whose label is likely wrong, by cleanlab's ``find_label_issues``
    (``prune_by_noise_rate``), lowest self-confidence first."""
    from cleanlab.filter import find_label_issues  # pandas and scikit-learn: seconds to import, so only here

    p = probabilities.double().numpy()
    p = p / p.sum(1, keepdims=True)
    found = find_label_issues(labels.numpy(), p, return_indices_ranked_by="self_confidence", n_jobs=1)
    return torch.from_numpy(np.asarray(found, dtype=np.int64))


def _result(loaded: runs.LoadedRun, source: str, folds: int | None, index: Tensor, labels: Tensor,
            probabilities: Tensor, fold_accuracy: list[float]) -> LabelIssues:
    if len(labels.unique()) < 2:
        where = "validation" if source == "validation" else "training"
        raise UserError(f"the {len(labels)} {where} images examined hold {len(labels.unique())} class(es); confident "
                        "learning compares classes, so it needs images of at least 2: hold out more images with "
                        "`val_split`, or cross-validate on the training set with `folds` K")
    issues = find(labels, probabilities)
    p = probabilities[issues]
    given = labels[issues]
    return LabelIssues(source, folds, list(loaded.classes), len(labels), index[issues], given, p.argmax(1),
                       p[torch.arange(len(issues)), given], p.amax(1), confident_joint(labels, probabilities),
                       fold_accuracy, runs.checkpoint_stamp(loaded.path))


def _probabilities(model: torch.nn.Module, loaded: runs.LoadedRun, x: Tensor | PixelStore, y: Tensor) -> Tensor:
    """The softmax of ``model`` on uint8 images ``x`` (read here), scored as the run scores (flip TTA where it
    did; no temperature: it does not move an image across cleanlab's per-class thresholds in a known way)."""
    pixels = x.read() if isinstance(x, PixelStore) else x
    device = next(model.parameters()).device
    scores = score(model, pixels.to(device), y.to(device), loaded.preprocess, tta=loaded.tta)
    assert scores.logits is not None
    return scores.logits.double().softmax(1)


def on_validation(loaded: runs.LoadedRun, data_dir: str | None = None) -> LabelIssues:
    """Confident learning on the run's validation split, scored by the run's model."""
    held = loaded.splits(data_dir)
    if not len(held.val_y):
        raise UserError(f"{loaded.run_dir or loaded.path} was trained without a validation split (`val_split` 0), "
                        "so it has no out-of-sample probabilities to find bad labels with; cross-validate on the "
                        "training set with `folds` K (trains K copies of the run), or train with a `val_split`")
    assert held.val_index is not None
    probabilities = _probabilities(loaded.model, loaded, held.val_x, held.val_y)
    return _result(loaded, "validation", None, held.val_index, held.val_y, probabilities, [])


def folds_of(labels: Tensor, folds: int) -> Tensor:
    """Each image's fold (0 … ``folds`` − 1): the images of each class dealt in turn, in a seeded order, so
    that every fold holds each class in the same proportion (to within one image)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(FOLD_SEED))
    order = order[labels[order].argsort(stable=True)]
    fold = torch.empty(len(labels), dtype=torch.long)
    fold[order] = torch.arange(len(labels)) % folds
    return fold


def _check_folds(folds: int, held: Splits) -> None:
    n = len(held.train_y)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise UserError(f"`folds` must be a whole number of at least 2 (got {folds!r}): K-fold cross-validation "
                        "trains K copies of the run, each on K − 1 folds of its training images")
    if folds > n:
        raise UserError(f"`folds` {folds} is more than the run's {n} training images; choose at most {n} "
                        "(5 or 10 is usual)")


def cross_validated(loaded: runs.LoadedRun, folds: int, data_dir: str | None = None,
                    progress: Progress | None = None) -> LabelIssues:
    """Confident learning on the run's training split, each image scored by one of ``folds`` copies of the
    run trained (with the run's own configuration and recipe) without it."""
    if loaded.config is None:
        raise UserError(f"{loaded.path} holds no training configuration, so it cannot be trained again; "
                        "find bad labels on its validation split instead (leave out `folds`)")
    held = loaded.splits(data_dir)
    _check_folds(folds, held)
    assert held.train_index is not None
    fold = folds_of(held.train_y, folds)
    probabilities = torch.zeros(len(held.train_y), len(loaded.classes), dtype=torch.float64)
    accuracy = []
    with tempfile.TemporaryDirectory(prefix="cnnlab-folds-") as tmp:
        for k in range(folds):
            part, kept = (fold == k).nonzero()[:, 0], (fold != k).nonzero()[:, 0]
            model = _train_fold(loaded, Path(tmp) / f"fold-{k}", kept, part, k, folds)
            shutil.rmtree(Path(tmp) / f"fold-{k}")  # its checkpoints: one copy's on the disk at a time
            probabilities[part] = _probabilities(model, loaded, take(held.train_x, part), held.train_y[part])
            accuracy.append(float((probabilities[part].argmax(1) == held.train_y[part]).double().mean()))
            log.info(f"fold {k + 1} of {folds}: trained on {len(kept)} images, top-1 {100 * accuracy[-1]:.1f}% on "
                     f"the {len(part)} it held out")
            if progress is not None:
                progress((k + 1) / folds)
    return _result(loaded, "cross-validation", folds, held.train_index, held.train_y, probabilities, accuracy)


def _train_fold(loaded: runs.LoadedRun, out: Path, kept: Tensor, part: Tensor, k: int, folds: int) -> torch.nn.Module:
    """A copy of the run trained on its training images ``kept`` (reporting on ``part``), in ``out``: its model."""
    assert loaded.config is not None

    def subset(s: Splits) -> Splits:
        return dataclasses.replace(s, train_x=take(s.train_x, kept), train_y=s.train_y[kept],
                                   train_index=None if s.train_index is None else s.train_index[kept],
                                   test_x=take(s.train_x, part), test_y=s.train_y[part])

    # The copies are scaffolding: logged nowhere but their temporary folder (not to the run's MLflow).
    cfg = dataclasses.replace(loaded.config, out=str(out), device=loaded.device.type, mlflow=False)
    try:
        train(cfg, subset=subset)
    except Interrupted as e:
        raise Interrupted(e.signum, f"stopped while training fold {k + 1} of {folds}; nothing was written") from None
    return runs.load(out, device=loaded.device).model


def keep(loaded: runs.LoadedRun, result: LabelIssues) -> Path:
    """Write ``result`` to the run folder's ``label_issues.json`` (atomically; nothing else is touched)."""
    if loaded.run_dir is None:
        raise UserError(f"{loaded.path} is not in a run folder (RUN_DIR/checkpoints/), so there is nowhere to keep "
                        "its label issues; give the run folder")
    return atomic_write(loaded.run_dir / LABEL_ISSUES_FILE, json.dumps(result.to_json(), indent=1))


def kept(loaded: runs.LoadedRun) -> LabelIssues | None:
    """What ``cnnlab labels`` kept for this checkpoint as it is now; None when there is none, it is for another
    checkpoint or it cannot be read."""
    if loaded.run_dir is None:
        return None
    path = loaded.run_dir / LABEL_ISSUES_FILE
    try:
        found = LabelIssues.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    if found.stamp != runs.checkpoint_stamp(loaded.path) or found.classes != loaded.classes:
        return None
    found.file = str(path)
    return found
