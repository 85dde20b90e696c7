"""Gathering what the report shows: the run's record, its scores on the test set, and pictures.

The record is read from the run folder (``config.json``, ``metrics.jsonl``); the model is loaded as
every other command loads it (:func:`cnnlab.run.load`: ``best.pt``, else ``last.pt``) and scored
with :func:`cnnlab.core.metrics.score` on the test images the run reported on; the pictures are the
figures of ``cnnlab visualize``, inlined without a file in between, drawn with small settings so
that a CPU draws them all in seconds. A section that cannot be drawn (the dataset is not on this
machine, say) gets a note saying why, and the rest of the report is still written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from cnnlab import run
from cnnlab.config import TrainConfig, from_saved
from cnnlab.core.device import pick_device
from cnnlab.core.errors import UserError
from cnnlab.core.metrics import breakdown, confusion_matrix, logits, score
from cnnlab.models.summary import summarize
from cnnlab.report import charts
from cnnlab.run import LoadedRun
from cnnlab.viz import render
from cnnlab.viz.figures import FIGURES, sanity_figure
from cnnlab.viz.job import Job
from cnnlab.viz.layers import default_layer, first_layer
from cnnlab.viz.sanity import Sanity, sanity_checks

__all__ = ["Contents", "Example", "Pair", "Picture", "TestResults", "gather", "read_metrics"]

MISCLASSIFIED_SHOWN = 40  # test images in the grid of mistakes
PAIRS_SHOWN = 6  # most-confused (true, predicted) pairs
PAIR_EXAMPLES = 6  # images shown for each pair
CAM_IMAGES = 4  # Grad-CAM: this many right and this many wrong
PATTERN_CLASSES = 10  # class models drawn
SMALL_MODEL_MACS = 100_000_000  # per image; below this the report runs on one CPU thread
# The explanations' checks, kept small here (cnnlab visualize sanity runs 8 images and every layer):
SANITY_IMAGES = 4  # test images, spread over the test set
SANITY_STEPS = ["conv5_x"]  # cascade steps measured (fc … conv5_x); the whole network is always added
SANITY_DELETION_STEPS = 8
SANITY_ROAD_FRACTIONS = (0.2, 0.5, 0.8)

log = logging.getLogger(__name__)


@dataclass
class Picture:
    uri: str  # data:image/png;base64,…
    alt: str


@dataclass
class Example:
    """One test image with what the model made of it."""

    index: int
    uri: str
    true: str
    pred: str
    prob: float  # the model's probability for its prediction


@dataclass
class Pair:
    true: str
    pred: str
    count: int
    share: float  # of the true class's test images
    examples: list[Example]


@dataclass
class TestResults:
    n: int
    top1: float
    loss: float
    per_class: list[tuple[str, float | None, int]]  # class, accuracy, test images
    confusion: Picture
    pairs: list[Pair]
    wrong: list[Example]  # a spread of the misclassified images
    wrong_total: int
    tta: bool = False  # scored with test-time flip augmentation, as the run scored itself


@dataclass
class Contents:
    run_dir: Path
    info: dict[str, Any]  # config.json
    steps: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    skipped_lines: int  # unreadable lines of metrics.jsonl (a crash mid-write leaves one)
    checkpoint: Path
    checkpoint_epoch: int | None
    classes: list[str]
    summary: dict[str, Any] | None = None
    curves: list[Picture] = field(default_factory=list)
    test: TestResults | None = None
    filters: list[Picture] = field(default_factory=list)
    features: list[Picture] = field(default_factory=list)
    cam_right: list[Picture] = field(default_factory=list)
    cam_wrong: list[Picture] = field(default_factory=list)
    patterns: list[Picture] = field(default_factory=list)
    pattern_steps: int = 0
    layers: tuple[str, str] = ("conv1", "conv5_x")  # the first layer and the last spatial feature block, as found
    sanity: Sanity | None = None
    sanity_images: list[int] = field(default_factory=list)  # the test images the checks ran on
    cascade: list[Picture] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)  # section id → why something is missing
    seconds: dict[str, float] = field(default_factory=dict)  # time spent on each section

    @cached_property
    def config(self) -> TrainConfig:
        return from_saved(self.info["config"], check=False)

    @property
    def last(self) -> dict[str, Any]:
        return self.epochs[-1]

    def note(self, section: str, text: str) -> None:
        self.notes.setdefault(section, []).append(text)


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Step and epoch records of ``metrics.jsonl`` (the last record of each step or epoch wins)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl, so it is not a finished cnnlab run folder; "
                        f"train into it first with: cnnlab train --out {run_dir}")
    steps: dict[int, dict[str, Any]] = {}
    epochs: dict[int, dict[str, Any]] = {}
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = record["kind"]
            if kind == "step":
                steps[int(record["step"])] = record
            elif kind == "epoch":
                epochs[int(record["epoch"])] = record
        except (ValueError, KeyError, TypeError):
            bad += 1
    if not epochs:
        raise UserError(f"{path} records no finished epoch yet; a report needs at least one "
                        f"(let training finish an epoch, or continue it with: cnnlab train --resume {run_dir})")
    return [steps[k] for k in sorted(steps)], [epochs[k] for k in sorted(epochs)], bad


def _read_info(run_dir: Path, loaded: LoadedRun) -> dict[str, Any]:
    path = run_dir / "config.json"
    try:
        info = json.loads(path.read_text())
        if isinstance(info, dict) and isinstance(info.get("config"), dict):
            return info
    except (OSError, ValueError):
        pass
    # The checkpoint carries the configuration too.
    return {"config": loaded.config.to_dict() if loaded.config else {}}


def _timed(contents: Contents, section: str, make: Callable[[], None]) -> None:
    """Run one section's work; a failure becomes a note in that section instead of no report."""
    start = time.perf_counter()
    try:
        with charts.plain_text():
            make()
    except UserError as e:
        contents.note(section, str(e))
    except Exception as e:  # a figure that fails must not cost the user the rest of the report
        contents.note(section, f"this part could not be drawn ({type(e).__name__}: {e})")
        log.warning("section %s could not be drawn: %s: %s", section, type(e).__name__, e)
    contents.seconds[section] = contents.seconds.get(section, 0.0) + time.perf_counter() - start


def _spread(items: list[int], k: int) -> list[int]:
    """``k`` items spread evenly over ``items`` (test sets are often ordered by class)."""
    if len(items) <= k:
        return list(items)
    picks = torch.linspace(0, len(items) - 1, k).round().long().tolist()
    return [items[i] for i in picks]


def _examples(loaded: LoadedRun, images: torch.Tensor, labels: torch.Tensor, indices: list[int]) -> list[Example]:
    if not indices:
        return []
    idx = torch.tensor(indices)
    with torch.no_grad():
        x = loaded.preprocess.to_input(images[idx].to(loaded.device))
        probs = logits(loaded.model, x, loaded.tta).softmax(1).cpu()  # the prediction the scores counted
    p, pred = probs.max(1)
    return [Example(i, charts.thumbnail(images[i]), loaded.classes[int(labels[i])], loaded.classes[int(pred[k])],
                    float(p[k])) for k, i in enumerate(indices)]


def _score_test(contents: Contents, loaded: LoadedRun, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    device = loaded.device
    scores = score(loaded.model, images.to(device), labels.to(device), loaded.preprocess, tta=loaded.tta)
    result = breakdown(scores, loaded.classes)
    classes = loaded.classes
    matrix = confusion_matrix(scores.predictions, scores.labels, len(classes))
    totals = matrix.sum(1)
    per_class = [(c, result["per_class"][c], int(totals[i])) for i, c in enumerate(classes)]

    pred, y = scores.predictions, scores.labels
    off = matrix.clone()
    off.fill_diagonal_(0)
    pairs = []
    for flat in off.flatten().argsort(descending=True)[:PAIRS_SHOWN].tolist():
        t, p = divmod(flat, len(classes))
        count = int(off[t, p])
        if count == 0:
            break
        where = ((y == t) & (pred == p)).nonzero()[:, 0].tolist()
        pairs.append(Pair(classes[t], classes[p], count, count / max(int(totals[t]), 1),
                          _examples(loaded, images, labels, where[:PAIR_EXAMPLES])))
    wrong = (pred != y).nonzero()[:, 0].tolist()
    contents.test = TestResults(len(y), result["top1"], result["loss"], per_class,
                                Picture(charts.confusion(result, classes), "confusion matrix of the test set"),
                                pairs, _examples(loaded, images, labels, _spread(wrong, MISCLASSIFIED_SHOWN)),
                                len(wrong), loaded.tta)
    return pred


def _viz(method: str, loaded: LoadedRun, alt: str, **choices: Any) -> list[Picture]:
    """Pictures from ``cnnlab visualize``'s figure code (``choices``: fields of its :class:`Job`), inlined."""
    figures = FIGURES[method].draw(Job(method, loaded, **choices))
    return [Picture(charts.png_uri(render.png(fig)), alt) for fig in figures.values()]


@contextmanager
def _threads_for(contents: Contents, device: torch.device) -> Iterator[None]:
    """One CPU thread for a small model: its tensors are too small to split, and on a busy machine the
    extra threads' waiting made the report ten times slower. Larger models keep every thread."""
    macs = contents.summary["macs"] if contents.summary else None
    before = torch.get_num_threads()
    small = device.type == "cpu" and macs is not None and macs < SMALL_MODEL_MACS
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


def gather(run_dir: Path, device: str = "auto") -> Contents:
    """Everything the page shows for the run folder ``run_dir``."""
    if not run_dir.exists():
        raise UserError(f"{run_dir} does not exist; give the run folder that cnnlab train wrote")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; cnnlab report reads a whole run folder "
                        "(config.json, metrics.jsonl, checkpoints/), not a single file")
    steps, epochs, bad = read_metrics(run_dir)
    loaded = run.load(run_dir, device=pick_device(device))
    training = loaded.checkpoint.training
    contents = Contents(run_dir, _read_info(run_dir, loaded), steps, epochs, bad, loaded.path,
                        int(training["epoch"]) if training is not None else None, list(loaded.classes))
    spec = loaded.spec

    def architecture() -> None:
        contents.summary = summarize(spec.name, image_size=loaded.preprocess.size, num_classes=spec.num_classes,
                                     width=spec.width, in_channels=spec.in_channels)

    def curves() -> None:
        if steps:
            contents.curves.append(Picture(charts.step_curves(steps, epochs),
                                           "training loss, accuracy and learning rate at every step"))
        contents.curves.append(Picture(charts.epoch_curves(epochs),
                                       "train, validation and test loss and accuracy after every epoch"))

    _timed(contents, "architecture", architecture)
    _timed(contents, "curves", curves)
    with _threads_for(contents, loaded.device):
        _pictures(contents, loaded)
    return contents


def _pictures(contents: Contents, loaded: LoadedRun) -> None:
    """Test-set scores and everything drawn from the model."""

    test: tuple[torch.Tensor, torch.Tensor] | None = None
    predictions: torch.Tensor | None = None

    def load_test() -> None:
        nonlocal test, predictions
        test = loaded.test_set()
        predictions = _score_test(contents, loaded, *test)

    _timed(contents, "per-class", load_test)
    if contents.test is None:
        why = contents.notes.get("per-class", ["the test set could not be read"])[-1]
        for section in ("confusion", "confused-pairs", "misclassified", "features", "gradcam", "explanations"):
            contents.note(section, f"needs the run's test set, which could not be read: {why}")

    pre = loaded.preprocess
    probe = torch.zeros(1, pre.channels, pre.size, pre.size, device=loaded.device)
    contents.layers = first, last = first_layer(loaded.model), default_layer(loaded.model, probe)
    _timed(contents, "filters", lambda: contents.filters.extend(
        _viz("filters", loaded, f"the filters of {first}", layers=[first])))
    if test is not None and predictions is not None:
        right = (predictions == test[1]).nonzero()[:, 0].tolist()
        wrong = (predictions != test[1]).nonzero()[:, 0].tolist()
        shown = _spread(right or wrong, 1)
        _timed(contents, "features", lambda: contents.features.extend(
            _viz("features", loaded, f"feature maps of test image {shown[0]} at {first} and {last}",
                 layers=[first, last], indices=shown)))

        def cams() -> None:
            if right:
                contents.cam_right.extend(_viz("cam", loaded, "Grad-CAM of correctly classified test images",
                                               kinds=["grad-cam"], indices=_spread(right, CAM_IMAGES)))
            else:
                contents.note("gradcam", "no test image was classified correctly")
            if wrong:
                contents.cam_wrong.extend(_viz("cam", loaded, "Grad-CAM of misclassified test images",
                                               kinds=["grad-cam"], indices=_spread(wrong, CAM_IMAGES)))
            else:
                contents.note("gradcam", "every test image was classified correctly: no mistakes to show")

        _timed(contents, "gradcam", cams)

        def explanations() -> None:
            images, _ = test
            shown = _spread(list(range(len(images))), SANITY_IMAGES)
            x = loaded.preprocess.to_input(images[shown].to(loaded.device))
            window = max(2, loaded.preprocess.size // 8)  # occlusion's own window, without overlap here
            result = sanity_checks(loaded.model, x, layers=SANITY_STEPS, deletion_steps=SANITY_DELETION_STEPS,
                                   road_fractions=SANITY_ROAD_FRACTIONS, options={"occlusion": {"stride": window}},
                                   random_labels_note="not run in the report; cnnlab visualize sanity runs it")
            contents.sanity, contents.sanity_images = result, shown
            with torch.no_grad():
                p, c = loaded.model(x[:1]).softmax(1)[0].max(0)
            figure = sanity_figure(result, render.image(loaded.preprocess.to_pixels(x[:1])[0]),
                                   f"test image {shown[0]}\npred {loaded.classes[int(c)]} ({float(p):.2f})")
            contents.cascade.append(Picture(charts.png_uri(render.png(figure)),
                                            "each method's map as the network's layers are "
                                            "re-initialised from the top"))

        _timed(contents, "explanations", explanations)
    # Class models: a few optimisation steps suffice at CIFAR size; larger inputs get fewer.
    contents.pattern_steps = 64 if loaded.preprocess.size <= 64 else 24
    classes = list(range(min(PATTERN_CLASSES, len(loaded.classes))))
    _timed(contents, "patterns", lambda: contents.patterns.extend(
        _viz("maximize", loaded, "class models: images optimised to be classified as each class",
             targets=classes, steps=contents.pattern_steps)))
