"""Gathering what the report shows: the run's record, its scores on the test set, and pictures.

The record is read from the run folder (``config.json``, ``metrics.jsonl``); the run is opened as
every other command opens it (:class:`cnnlab.inspect.Inspection`: ``best.pt``, else ``last.pt``) and
its scores on the test images it reported on are the inspector's; the pictures are the figures of
``cnnlab visualize`` on the inspector's results, inlined without a file in between, drawn with the
registry's quick settings so that a CPU draws them all in seconds. A section that cannot be drawn
(the dataset is not on this machine, say) gets a note saying why, and the rest of the report is
still written.
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

from cnnlab.config import TrainConfig, from_saved
from cnnlab.core.calibration import assess
from cnnlab.core.errors import UserError
from cnnlab.core.metrics import DENSE_CONFUSION_CLASSES, Scores, breakdown
from cnnlab.inspect import Choices, Inspection, checks, show
from cnnlab.inspect.inspector import spread
from cnnlab.inspect.registry import METHODS
from cnnlab.inspect.results import Transfer
from cnnlab.inspect.whole_set import PAIR_EXAMPLES, PAIRS
from cnnlab.report import charts
from cnnlab.run import LoadedRun
from cnnlab.train.logging import read_metrics
from cnnlab.visualize import render
from cnnlab.visualize.figures import draw, sanity_figure
from cnnlab.viz.mistakes import confused_pairs
from cnnlab.viz.sanity import Sanity

__all__ = ["BadLabel", "BadLabels", "Contents", "Example", "Extremes", "Loss", "Pair", "Picture", "TestResults",
           "gather", "read_metrics"]

MISCLASSIFIED_SHOWN = 40  # test images in the grid of mistakes
PATTERN_CLASSES = 10  # class models drawn
TYPICAL_CLASSES = 20  # classes whose most and least typical images are shown
BAD_LABELS_SHOWN = 40  # candidate label errors shown (label_issues.json holds them all)
SMALL_MODEL_MACS = 100_000_000  # per image; below this the report runs on one CPU thread

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
    reverse: int = 0  # images of `pred` predicted as `true`


@dataclass
class Loss:
    example: Example
    loss: float  # cross-entropy with the given label
    label_prob: float  # the probability of the given label


@dataclass
class Extremes:
    """One class's test images nearest to and farthest from its mean direction of penultimate features."""

    name: str
    most: list[Example]
    least: list[Example]


@dataclass
class TestResults:
    n: int
    top1: float
    loss: float
    per_class: list[tuple[str, float | None, int]]  # class, accuracy, test images
    confusion: Picture | None  # None above DENSE_CONFUSION_CLASSES classes
    pairs: list[Pair]
    wrong: list[Example]  # a spread of the misclassified images
    wrong_total: int
    tta: bool | str = False  # scored with test-time augmentation (core.metrics.logits), as the run scored itself
    # cnnlab.core.calibration.assess's figures (interval, top-5, precision/recall/F1, calibration), as evaluate's
    figures: dict[str, Any] = field(default_factory=dict)
    reliability: Picture | None = None


@dataclass
class BadLabel:
    """A training image whose label is likely wrong."""

    rank: int
    index: int  # among the dataset's training images
    uri: str
    given: str
    suggested: str
    self_confidence: float  # the out-of-sample probability of the given label


@dataclass
class BadLabels:
    source: str  # "validation" or "cross-validation"
    folds: int | None
    examined: int
    found: int
    kept: bool  # read from the run's label_issues.json (cnnlab labels), not computed for the report
    shown: list[BadLabel]


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
    pattern_check: Transfer | None = None  # the class models shown to an independently trained run
    pattern_colour: str = ""  # where the class models' colour decorrelation came from
    layers: tuple[str, str] = ("conv1", "conv5_x")  # the first layer and the last spatial feature block, as found
    sanity: Sanity | None = None
    sanity_images: list[int] = field(default_factory=list)  # the test images the checks ran on
    cascade: list[Picture] = field(default_factory=list)
    embedding: Picture | None = None
    embedding_facts: dict[str, Any] = field(default_factory=dict)  # n, layer, dims, method, seed
    losses: list[Loss] = field(default_factory=list)
    typical: list[Extremes] = field(default_factory=list)
    typical_facts: dict[str, Any] = field(default_factory=dict)  # layer, classes
    bad_labels: BadLabels | None = None
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
    return [items[i] for i in spread(len(items), k)]


def _examples(classes: list[str], images: torch.Tensor, scores: Scores, indices: list[int]) -> list[Example]:
    """Test images with the prediction the scores counted (flip TTA where the run scored so)."""
    assert scores.probabilities is not None
    return [Example(i, charts.thumbnail(images[i]), classes[int(scores.labels[i])],
                    classes[int(scores.predictions[i])], float(scores.probabilities[i].max()))
            for i in indices]


def _score_test(contents: Contents, inspection: Inspection) -> Scores:
    images, _ = inspection.test_set()
    scores = inspection.scores()
    classes = inspection.classes
    result = breakdown(scores, classes)
    pred, y = scores.predictions, scores.labels
    totals = torch.bincount(y, minlength=len(classes))
    per_class = [(c, result["per_class"][c], int(totals[i])) for i, c in enumerate(classes)]
    # From the matrix's nonzero cells, not the matrix: a run of 100,000 classes has no room for its square.
    pairs = [Pair(classes[c.true], classes[c.predicted], c.count, c.share,
                  _examples(classes, images, scores, c.examples), c.reverse)
             for c in confused_pairs(pred, y, len(classes), PAIRS, PAIR_EXAMPLES)]
    matrix = None
    if result["confusion"] is not None:
        matrix = Picture(charts.confusion(result, classes), "confusion matrix of the test set")
    else:
        contents.note("confusion", f"{len(classes):,} classes are too many for a confusion matrix (more than "
                                   f"{DENSE_CONFUSION_CLASSES:,}); cnnlab evaluate lists its nonzero cells")
    wrong = (pred != y).nonzero()[:, 0].tolist()
    contents.test = TestResults(len(y), result["top1"], result["loss"], per_class,
                                matrix, pairs, _examples(classes, images, scores, _spread(wrong, MISCLASSIFIED_SHOWN)),
                                len(wrong), inspection.run.tta)
    assert scores.logits is not None
    figures = {"n": len(y), **assess(scores.logits, y, classes, inspection.run.temperature)}
    contents.test.figures = figures
    contents.test.reliability = Picture(charts.reliability(figures), "reliability diagram of the test set")
    return scores


def _viz(inspection: Inspection, method: str, alt: str, **choices: Any) -> list[Picture]:
    """Pictures of ``cnnlab visualize``'s figures of ``method`` for ``choices``, inlined."""
    results = show(inspection, method, Choices.of(**choices))
    return [Picture(charts.png_uri(render.png(fig)), alt) for r in results for fig in draw(r).values()]


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


def gather(run_dir: Path, device: str = "auto", check_with: str | Path | None = None) -> Contents:
    """Everything the page shows for the run folder ``run_dir``; ``check_with``: an independently trained run
    to show the class models to."""
    if not run_dir.exists():
        raise UserError(f"{run_dir} does not exist; give the run folder that cnnlab train wrote")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; cnnlab report reads a whole run folder "
                        "(config.json, metrics.jsonl, checkpoints/), not a single file")
    steps, epochs, bad = read_metrics(run_dir)
    inspection = Inspection.open(run_dir, device=device)
    if check_with is not None:
        inspection.check_run(check_with)  # a run that cannot judge the class models fails now, not as a note
    loaded = inspection.run
    training = loaded.checkpoint.training
    contents = Contents(run_dir, _read_info(run_dir, loaded), steps, epochs, bad, loaded.path,
                        int(training["epoch"]) if training is not None else None, list(loaded.classes))

    def architecture() -> None:
        contents.summary = inspection.summary()

    def curves() -> None:
        if steps:
            contents.curves.append(Picture(charts.step_curves(steps, epochs),
                                           "training loss, accuracy and learning rate at every step"))
        contents.curves.append(Picture(charts.epoch_curves(epochs),
                                       "train, validation and test loss and accuracy after every epoch"))

    _timed(contents, "architecture", architecture)
    _timed(contents, "curves", curves)
    with _threads_for(contents, loaded.device):
        _pictures(contents, inspection, check_with)
        _timed(contents, "bad-labels", lambda: _bad_labels(contents, inspection))
    return contents


def _bad_labels(contents: Contents, inspection: Inspection) -> None:
    """The training images whose label is likely wrong: what ``cnnlab labels`` kept for this checkpoint, else
    confident learning on the validation split, computed here the same way."""
    found = inspection.kept_label_issues()
    shown = list(range(min(BAD_LABELS_SHOWN, len(found.index))))
    images = inspection.training_images(found.index[shown])[0] if shown else None
    classes = found.classes
    contents.bad_labels = BadLabels(
        found.source, found.folds, found.examined, len(found.index), found.file is not None,
        [BadLabel(k + 1, int(found.index[k]), charts.thumbnail(images[k]), classes[int(found.given[k])],
                  classes[int(found.suggested[k])], float(found.self_confidence[k])) for k in shown])


def _pictures(contents: Contents, inspection: Inspection, check_with: str | Path | None) -> None:
    """Test-set scores and everything drawn from the model."""

    scores: Scores | None = None

    def load_test() -> None:
        nonlocal scores
        scores = _score_test(contents, inspection)

    _timed(contents, "per-class", load_test)
    if contents.test is None:
        why = contents.notes.get("per-class", ["the test set could not be read"])[-1]
        for section in ("confusion", "calibration", "confused-pairs", "misclassified", "embedding", "mistakes",
                        "features", "gradcam", "explanations"):
            contents.note(section, f"needs the run's test set, which could not be read: {why}")

    contents.layers = first, last = inspection.first_layer, inspection.last_layer
    _timed(contents, "filters", lambda: contents.filters.extend(
        _viz(inspection, "filters", f"the filters of {first}", layer=[first])))
    if scores is not None:
        _whole_set(contents, inspection, scores)
        _model_pictures(contents, inspection, scores)
    _timed(contents, "patterns", lambda: _class_models(contents, inspection, check_with))


def _class_models(contents: Contents, inspection: Inspection, check_with: str | Path | None) -> None:
    """The class models, and what an independently trained run makes of them where one is given."""
    # A few optimisation steps suffice at CIFAR size; larger inputs get fewer.
    contents.pattern_steps = 64 if inspection.preprocess.size <= 64 else 24
    classes = list(range(min(PATTERN_CLASSES, len(inspection.classes))))
    results = show(inspection, "maximize", Choices.of(target=classes, steps=contents.pattern_steps,
                                                      check_with=check_with))
    contents.pattern_check, contents.pattern_colour = results[0].check, results[0].colour
    contents.patterns.extend(Picture(charts.png_uri(render.png(fig)), "class models: images optimised to be "
                                     "classified as each class") for r in results for fig in draw(r).values())


def _model_pictures(contents: Contents, inspection: Inspection, scores: Scores) -> None:
    """Feature maps, Grad-CAMs and the explanation checks, on test images."""
    first, last = contents.layers
    right = (scores.predictions == scores.labels).nonzero()[:, 0].tolist()
    wrong = (scores.predictions != scores.labels).nonzero()[:, 0].tolist()
    shown = _spread(right or wrong, 1)
    _timed(contents, "features", lambda: contents.features.extend(
        _viz(inspection, "features", f"feature maps of test image {shown[0]} at {first} and {last}",
             layer=[first, last], index=shown)))
    cam = METHODS["cam"].quick

    def cams() -> None:
        if right:
            contents.cam_right.extend(_viz(inspection, "cam", "Grad-CAM of correctly classified test images",
                                           kind=cam["kind"], index=_spread(right, cam["count"])))
        else:
            contents.note("gradcam", "no test image was classified correctly")
        if wrong:
            contents.cam_wrong.extend(_viz(inspection, "cam", "Grad-CAM of misclassified test images",
                                           kind=cam["kind"], index=_spread(wrong, cam["count"])))
        else:
            contents.note("gradcam", "every test image was classified correctly: no mistakes to show")

    _timed(contents, "gradcam", cams)

    def explanations() -> None:
        chosen = spread(len(scores.labels), METHODS["sanity"].quick["count"])
        images = inspection.images(indices=chosen)
        result = checks.sanity(inspection, images, quick=True)
        contents.sanity, contents.sanity_images = result, chosen
        caption = inspection.caption(images, 0, name=f"test image {chosen[0]}", true=False)
        figure = sanity_figure(result, render.image(images.pixels[0]), caption)
        contents.cascade.append(Picture(charts.png_uri(render.png(figure)),
                                        "each method's map as the network's layers are re-initialised from the top"))

    _timed(contents, "explanations", explanations)


def _whole_set(contents: Contents, inspection: Inspection, scores: Scores) -> None:
    """The test set's embedding, its top losses and each class's most and least typical images."""
    images, _ = inspection.test_set()
    classes = inspection.classes

    def embedding() -> None:
        result = inspection.embedding()
        (figure,) = draw(result).values()
        contents.embedding = Picture(charts.png_uri(render.png(figure)),
                                     "the test images on a t-SNE map of their penultimate features, by true class")
        contents.embedding_facts = {"n": len(result.indices), "layer": result.layer, "method": result.method,
                                    "dims": int(result.features.shape[1]), "seed": result.seed}

    def mistakes() -> None:
        found = inspection.mistakes()
        contents.losses = [Loss(_examples(classes, images, scores, [x.index])[0], x.loss, x.label_probability)
                           for x in found.losses]
        contents.typical = [Extremes(classes[t.label], _examples(classes, images, scores, t.most),
                                     _examples(classes, images, scores, t.least))
                            for t in found.typical[:TYPICAL_CLASSES]]
        contents.typical_facts = {"layer": found.layer, "classes": len(found.typical)}

    _timed(contents, "embedding", embedding)
    _timed(contents, "mistakes", mistakes)
