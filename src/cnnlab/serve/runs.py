"""A run as the explorer serves it: its model, its test set, and what each panel asks of them.

Nothing is computed here that cnnlab does not already compute elsewhere: predictions come from
:func:`cnnlab.predict.ranked`; explanations (the maps the trust scores are measured on), feature maps,
filters, top images, activation maximisation, the test set's scores and the trust checks from the run's
:class:`cnnlab.inspect.Inspection`; curves from the report's charts. This module turns the results into
PNGs and JSON and says which are heavy jobs.

Forward hooks are registered on the model by most methods, so two threads must never run one model
object at once. Each run therefore keeps a small pool of inspections on copies of its model for the
interactive requests (a request takes a free one, or waits for one in its own thread, never on the event
loop), and one more for the background worker, so that a long job never holds a copy a request needs.
"""

from __future__ import annotations

import copy
import json
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.colors import to_hex
from torch import Tensor

from cnnlab import run
from cnnlab.core.errors import UserError
from cnnlab.core.files import remove_stale
from cnnlab.core.images import UPLOAD_DECODED_BYTES, TooLarge
from cnnlab.core.metrics import DENSE_CONFUSION_CLASSES, confusion_matrix
from cnnlab.inspect import Inspection, checks, registry, whole_set
from cnnlab.inspect.inspector import spread
from cnnlab.inspect.labels import LABEL_ISSUES_FILE
from cnnlab.inspect.registry import EXPLAINERS
from cnnlab.inspect.results import Images
from cnnlab.predict import ranked
from cnnlab.report import charts
from cnnlab.report.dossier import contents
from cnnlab.report.sections import read_metrics
from cnnlab.serve.jobs import Jobs, Progress, Status, Task
from cnnlab.serve.store import Image, ImageStore
from cnnlab.visualize import render
from cnnlab.visualize.figures import class_colours
from cnnlab.viz.maximize import STEPS

__all__ = ["METHODS", "Served", "open_run"]

log = logging.getLogger(__name__)

TOP_K = 5
POOL = 2  # model copies for interactive requests, per run
TOP_IMAGES = 9  # per channel
MAXIMIZE_STEPS = STEPS  # as `cnnlab visualize maximize`
BROWSE = 60  # thumbnails per list of test images
MAX_CHANNELS = 1024  # feature maps sent for one layer
UNIT_STEPS = 64  # of a unit page's maximisation, as `cnnlab visualize dossier`
UNIT_VARIANTS = 4  # maximised images per unit, as `cnnlab visualize dossier`
# The methods that take a layer (the CAMs and guided Grad-CAM); the other attributions work on the input alone.
LAYERED = frozenset(name for name, t in EXPLAINERS.items() if "layer" in t.uses)
METHODS = list(EXPLAINERS)  # the explorer's explanations: the registry's CAMs and attributions


def png(rgb: np.ndarray) -> str:
    """RGB (H, W, 3) or gray (H, W) in [0, 1] as a PNG data URI at its own size (the page enlarges it
    pixel for pixel); the report's :func:`cnnlab.report.charts.thumbnail` encodes it."""
    a = np.clip(np.rint(np.asarray(rgb, dtype=np.float32) * 255), 0, 255).astype(np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return charts.thumbnail(torch.from_numpy(np.ascontiguousarray(a)), most=max(a.shape[1:]))


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


@dataclass
class Served:
    """One run folder given to ``cnnlab serve``."""

    index: int
    name: str
    inspection: Inspection
    jobs: Jobs
    images: ImageStore
    _pool: queue.Queue[Inspection] = field(default_factory=queue.Queue, repr=False)
    _worker_inspection: Inspection | None = field(default=None, repr=False)
    _test_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _curves: list[dict[str, str]] | None = field(default=None, repr=False)
    _test_error: str | None = field(default=None, repr=False)  # why the test set cannot be read, if it cannot

    @property
    def loaded(self) -> run.LoadedRun:
        return self.inspection.run

    @property
    def summary(self) -> dict[str, Any]:
        return self.inspection.summary()

    @property
    def layers(self) -> list[str]:
        """The layers whose feature maps a CAM can use, from the image up."""
        return self.inspection.feature_layers

    @property
    def default_layer(self) -> str:
        return self.inspection.last_layer

    @property
    def run_dir(self) -> Path:
        assert self.loaded.run_dir is not None
        return self.loaded.run_dir

    @property
    def classes(self) -> list[str]:
        return self.loaded.classes

    @property
    def explore(self) -> Path:
        return self.run_dir / "explore"

    @contextmanager
    def inspector(self) -> Iterator[Inspection]:
        """The run on a copy of the model no other request is using (waits for one in this thread)."""
        i = self._pool.get()
        try:
            yield i
        finally:
            self._pool.put(i)

    def test_set(self) -> tuple[Tensor, Tensor]:
        """The test set, read by :func:`open_run` (a ``UserError`` saying why when it could not be)."""
        if self._test_error is not None:
            raise UserError(self._test_error)
        with self._test_lock:
            return self.loaded.test_set()

    # --- images -------------------------------------------------------------------------------------

    def decode(self, data: bytes) -> Tensor:
        """uint8 pixels of uploaded bytes, as ``cnnlab predict`` reads the file; ``UserError`` if they are
        not an image."""
        try:
            return self.loaded.preprocess.read(data, max_bytes=UPLOAD_DECODED_BYTES)
        except TooLarge as e:
            raise UserError(str(e)) from None
        except ValueError as e:
            raise UserError(f"{e}; give an image file (PNG, JPEG, GIF, BMP, TIFF, WebP …)") from None

    def pixels(self, ref: str, served: list[Served]) -> Image:
        """The image ``ref`` names: ``u-<id>`` an upload, ``t<run>-<index>`` a test image of a served run,
        ``l<run>-<index>`` a training image of this run (a candidate bad label)."""
        found = re.fullmatch(r"l([0-9]{1,4})-([0-9]{1,9})", ref)
        if found:
            return self._training_image(int(found[1]), int(found[2]))
        m = re.fullmatch(r"t([0-9]{1,4})-([0-9]{1,9})", ref)  # ASCII digits only
        if m:
            source, index = int(m[1]), int(m[2])
            if source >= len(served):
                raise LookupError(ref)
            images, labels = served[source].test_set()
            if index >= len(labels):
                raise LookupError(ref)
            pixels = images[index]
            if pixels.shape[0] != self.loaded.preprocess.channels:
                raise UserError(f"test image {index} of {served[source].name} has {pixels.shape[0]} channels; "
                                f"{self.name} reads {self.loaded.preprocess.channels}")
            label = served[source].classes[int(labels[index])]
            return Image(f"test image {index}", {self.index: pixels}, label if source == self.index else None)
        image = self.images.get(ref)
        if image is None or self.index not in image.pixels:
            raise LookupError(ref)
        return image

    def _training_image(self, source: int, index: int) -> Image:
        """Training image ``index`` of this run's dataset, with its given label (``LookupError`` for another
        run's or one that does not exist)."""
        if source != self.index:
            raise LookupError(f"l{source}-{index}")
        try:
            with self._test_lock:
                images, labels = self.inspection.training_images(torch.tensor([index]))
        except IndexError:
            raise LookupError(f"l{source}-{index}") from None
        return Image(f"training image {index} (given label {self.classes[int(labels[0])]})", {self.index: images[0]})

    def _images(self, inspection: Inspection, image: Image) -> Images:
        return inspection.pixels(image.pixels[self.index][None], [image.name])

    # --- the panels ---------------------------------------------------------------------------------

    def predict(self, image: Image, tta: bool | None) -> dict[str, Any]:
        # On: the augmentation the run scored with (flips, or airbench's flips and shifts), else flips.
        tta = self.loaded.tta if tta is None or (tta and self.loaded.tta) else tta
        temperature = self.loaded.temperature  # read each time: `evaluate --calibrate` may have fitted one since
        with self.inspector() as i:
            images = self._images(i, image)
            (top,) = ranked(i.model, self.classes, images.x, TOP_K, tta, temperature)
        for t in top:
            t["percent"] = f"{100 * t['prob']:.1f}%"  # as `cnnlab predict` prints it
        size = self.loaded.preprocess.size
        return {"run": self.index, "image": image.name, "label": image.label, "tta": tta, "top": top,
                "temperature": temperature, "input": png(render.image(images.pixels[0])), "size": f"{size}×{size}"}

    def explain(self, image: Image, method: str, target: int | None, layer: str | None) -> dict[str, Any]:
        if method not in EXPLAINERS:
            raise UserError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
        if target is not None and not 0 <= target < len(self.classes):
            raise UserError(f"class {target} is out of range (0 … {len(self.classes) - 1})")
        layer = (layer or self.default_layer) if method in LAYERED else None
        with self.inspector() as i:
            i.layers([layer] if layer else [])  # an unknown name is a UserError
            images = self._images(i, image)
            if target is None:  # the class the page shows first: the top-1, scored as the run scores
                target = ranked(i.model, self.classes, images.x, 1, self.loaded.tta)[0][0]["index"]
            importance = i.importance(images, method, torch.tensor([target]), layer)
        panel = render.Panel(importance[0].float().cpu().numpy(), under=render.image(images.pixels[0]),
                             symmetric=EXPLAINERS[method].signed)
        return {"run": self.index, "method": method, "target": int(target), "label": self.classes[int(target)],
                "layer": layer, "picture": png(render.rgb(panel))}

    def features(self, image: Image, layer: str) -> dict[str, Any]:
        with self.inspector() as i:
            maps = i.features(self._images(i, image), layer).maps[0]
        shown = maps[:MAX_CHANNELS].numpy()
        lo, hi = float(shown.min()), float(shown.max())  # one range for all, so brightness compares
        tiles = [png(render.colorize(c, render.ACTIVATION, lo, hi)) for c in shown]
        return {"layer": layer, "shape": list(maps.shape), "range": [lo, hi], "tiles": tiles,
                "shown": len(tiles)}

    def channels_of(self, layer: str) -> int:
        """How many channels ``layer`` outputs (a UserError if it has no feature maps)."""
        with self.inspector() as i:
            return i.channels(layer)

    def filters(self, layer: str, channel: int) -> dict[str, Any] | None:
        """The weights of the layer's first convolution for output ``channel``, when that convolution has
        as many outputs as the layer (its channel is then the layer's own for a conv layer)."""
        try:
            found = self.inspection.filters(layer, ())
        except UserError:
            return None
        weight = found.weight
        if channel >= weight.shape[0]:
            return None
        w = render.minmax(weight[channel:channel + 1])[0]  # min–max over this filter, as `visualize filters`
        if w.shape[0] == 3:
            tiles = [png(w.permute(1, 2, 0).numpy())]
        else:
            tiles = [png(render.colorize(c.numpy(), "gray", 0.0, 1.0)) for c in w[:64]]
        return {"conv": found.path, "shape": list(weight.shape[1:]), "tiles": tiles, "inputs": int(weight.shape[1])}

    def test_thumbnails(self, indices: list[int]) -> list[dict[str, Any]]:
        """Test images as thumbnails with their true class and the reference the page picks them by."""
        images, labels = self.test_set()
        return [{"thumb": charts.thumbnail(images[i]), "label": self.classes[int(labels[i])],
                 "ref": f"t{self.index}-{i}"} for i in indices]

    def training_thumbnails(self, issues: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Label-issue candidates (``label_issues.json``'s entries) with a thumbnail each and the reference the
        page picks them by."""
        if not issues:
            return []
        with self._test_lock:  # the dataset is opened once, by one thread
            images, _ = self.inspection.training_images(torch.tensor([i["index"] for i in issues]))
        return [{**issue, "thumb": charts.thumbnail(images[k]), "ref": f"l{self.index}-{issue['index']}"}
                for k, issue in enumerate(issues)]

    def curves(self) -> list[dict[str, str]]:
        if self._curves is None:
            steps, epochs, _ = read_metrics(self.run_dir)
            with charts.plain_text():
                pictures = []
                if steps:
                    pictures.append({"src": charts.step_curves(steps, epochs),
                                     "alt": "training loss, accuracy and learning rate at every step"})
                pictures.append({"src": charts.epoch_curves(epochs),
                                 "alt": "train, validation and test loss and accuracy after every epoch"})
            self._curves = pictures
        return self._curves

    # --- heavy jobs ---------------------------------------------------------------------------------

    def _job(self, kind: str, params: dict[str, Any], file: str, compute: Callable[[Progress], dict[str, Any]]) -> Task:
        stamp = {"kind": kind, **run.checkpoint_stamp(self.loaded.path), **params}
        key = f"{self.index}:{kind}:" + ":".join(f"{k}={v}" for k, v in params.items())
        return Task(key, self.explore / file, stamp, compute)

    def _worker(self) -> Inspection:
        # Only the worker thread uses this copy.
        if self._worker_inspection is None:
            self._worker_inspection = self.inspection.on(copy.deepcopy(self.loaded.model))
        return self._worker_inspection

    def scores(self) -> Status:
        """The test set's predictions and their confidence (for the confusion matrix and browsing)."""
        tta = self.loaded.tta

        def compute(progress: Progress) -> dict[str, Any]:
            self.test_set()  # a UserError saying why, when it cannot be read
            s = self._worker().scores()
            assert s.confidence is not None
            return {"predictions": s.predictions.tolist(), "labels": s.labels.tolist(),
                    "confidence": s.confidence.tolist(), "top1": s.top1}

        # The confidences are the calibrated ones where a temperature is kept: a new one makes them stale.
        return self.jobs.request(self._job("scores", {"tta": tta, "temperature": self.loaded.temperature},
                                           "scores.json", compute))

    def top_images(self, layer: str, channel: int) -> Status:
        def compute(progress: Progress) -> dict[str, Any]:
            self.test_set()
            found = self._worker().top_images(layer, channel, TOP_IMAGES, progress=progress)
            return {"indices": found.indices.tolist(), "scores": found.scores.tolist(),
                    "boxes": [list(b) for b in found.boxes], "size": self.loaded.preprocess.size}

        return self.jobs.request(self._job("top-images", {"layer": layer, "channel": channel},
                                           f"top-images/{_file_part(layer)}-{channel}.json", compute))

    def maximized(self, layer: str, channel: int) -> Status:
        def compute(progress: Progress) -> dict[str, Any]:
            found = self._worker().maximize_channels(layer, [channel], MAXIMIZE_STEPS, progress=progress)
            return {"picture": png(render.image(found.pixels[0])), "steps": MAXIMIZE_STEPS}

        return self.jobs.request(self._job("maximize", {"layer": layer, "channel": channel, "steps": MAXIMIZE_STEPS},
                                           f"maximize/{_file_part(layer)}-{channel}.json", compute))

    def units(self, layer: str) -> Status:
        """The unit pages of every channel of ``layer`` (:func:`cnnlab.report.dossier.contents`), as
        ``cnnlab visualize dossier`` writes them."""
        steps, variants = UNIT_STEPS, UNIT_VARIANTS

        def compute(progress: Progress) -> dict[str, Any]:
            images, _ = self.test_set()
            found = self._worker().units(layer, variants=variants, steps=steps, progress=progress)
            return contents(found, images, self.name)

        return self.jobs.request(self._job("units", {"layer": layer, "steps": steps, "variants": variants},
                                           f"units/{_file_part(layer)}.json", compute))

    def bad_labels(self) -> Status:
        """The training images whose label is likely wrong: what ``cnnlab labels`` kept, else confident learning
        on the validation split (:meth:`cnnlab.inspect.Inspection.kept_label_issues`)."""
        kept = self.run_dir / LABEL_ISSUES_FILE

        def compute(progress: Progress) -> dict[str, Any]:
            found = self._worker().kept_label_issues()
            return {**found.to_json(), "kept": found.file is not None}

        stamp_file = kept.stat().st_mtime_ns if kept.is_file() else None
        return self.jobs.request(self._job("bad-labels", {"kept": stamp_file}, "bad-labels.json", compute))

    def trust(self) -> Status:
        """The explanations' checks: ``cnnlab visualize sanity``'s result when the run has one, else the
        report's shorter version on a few test images."""
        full = self.run_dir / "viz" / "sanity" / "sanity.json"

        def compute(progress: Progress) -> dict[str, Any]:
            try:
                saved = json.loads(full.read_text())
                return {"source": "cnnlab visualize sanity", "methods": _verdicts(saved)}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
            _, labels = self.test_set()
            worker = self._worker()
            images = worker.images(indices=spread(len(labels), registry.METHODS["sanity"].quick["count"]))
            done = [0]

            def say(message: str) -> None:  # about one message per method and cascade step
                done[0] += 1
                progress(min(0.95, done[0] / (2 * len(EXPLAINERS) + 4)))

            result = checks.sanity(worker, images, quick=True, progress=say)
            return {"source": f"checks on {len(images.names)} test images (as in the report)",
                    "methods": _verdicts(result.to_json())}

        stamp_file = full.stat().st_mtime_ns if full.is_file() else None
        return self.jobs.request(self._job("trust", {"sanity": stamp_file}, "trust.json", compute))


    def embedding(self) -> Status:
        """The test set's t-SNE map (:meth:`Inspection.embedding`), with each class's colour as the report
        draws it."""
        def compute(progress: Progress) -> dict[str, Any]:
            self.test_set()
            found = self._worker().embedding().to_json()
            return {**found, "colours": [to_hex(c) for c in class_colours(len(self.classes))]}

        # The probabilities are the calibrated ones where a temperature is kept: a new one makes them stale.
        params = {"tta": self.loaded.tta, "temperature": self.loaded.temperature, "most": whole_set.MOST}
        return self.jobs.request(self._job("embedding", params, "embedding.json", compute))

    def mistakes(self) -> Status:
        """The most-confused pairs, the top losses and each class's most and least typical test images."""
        def compute(progress: Progress) -> dict[str, Any]:
            self.test_set()
            return self._worker().mistakes().to_json()

        return self.jobs.request(self._job("mistakes", {"tta": self.loaded.tta, "temperature": self.loaded.temperature},
                                           "mistakes.json", compute))


def _verdicts(saved: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: its verdict, each check's outcome and the numbers the table shows."""
    out = {}
    for name, r in saved["methods"].items():
        judged = saved.get("settings", {}).get("judged_at")
        rho = r.get("randomisation_rho", {})
        out[name] = {"verdict": r.get("verdict"), "checks": r.get("checks", {}),
                     "randomisation_rho": rho.get(judged) if judged else None,
                     "insertion_auc": r.get("insertion_auc"), "road": r.get("road"),
                     "deletion_auc": r.get("deletion_auc")}
    return out


def confusion(status: Status, classes: list[str]) -> dict[str, Any] | None:
    """The confusion matrix (row: true class, column: predicted) of the finished scores job."""
    if status.result is None:
        return None
    r = status.result
    if len(classes) > DENSE_CONFUSION_CLASSES:  # its classes² cells would not fit (100,000 classes: 80 GB)
        return None
    m = confusion_matrix(torch.tensor(r["predictions"]), torch.tensor(r["labels"]), len(classes))
    return {"matrix": m.tolist(), "top1": r["top1"], "n": len(r["labels"])}


def choose(status: Status, which: str, classes: list[str]) -> list[int]:
    """Test image indices for a browse filter: ``class:K``, ``wrong``, ``confident-wrong`` (most confident
    mistakes first) or ``cell:T,P`` (true T predicted as P)."""
    assert status.result is not None
    pred = torch.tensor(status.result["predictions"])
    y = torch.tensor(status.result["labels"])
    conf = torch.tensor(status.result["confidence"])
    k = len(classes)
    m = re.fullmatch(r"class:([0-9]{1,6})", which)  # ASCII digits only: int() would take others too
    c = re.fullmatch(r"cell:([0-9]{1,6}),([0-9]{1,6})", which)
    if m and int(m[1]) < k:
        picked = (y == int(m[1])).nonzero()[:, 0]
    elif c and int(c[1]) < k and int(c[2]) < k:
        picked = ((y == int(c[1])) & (pred == int(c[2]))).nonzero()[:, 0]
    elif which == "wrong":
        picked = (pred != y).nonzero()[:, 0]
    elif which == "confident-wrong":
        wrong = (pred != y).nonzero()[:, 0]
        picked = wrong[conf[wrong].argsort(descending=True, stable=True)]
    else:
        raise UserError(f"unknown list of test images {which!r}")
    return picked.tolist()


def thumbnails(served: Served, status: Status, indices: list[int]) -> list[dict[str, Any]]:
    assert status.result is not None
    images, _ = served.test_set()
    r = status.result
    return [{"ref": f"t{served.index}-{i}", "index": i, "thumb": charts.thumbnail(images[i]),
             "true": served.classes[r["labels"][i]], "pred": served.classes[r["predictions"][i]],
             "confidence": r["confidence"][i]} for i in indices[:BROWSE]]


def open_run(index: int, path: str | Path, jobs: Jobs, images: ImageStore, taken: set[str]) -> Served:
    """A run folder loaded on the CPU, with its pool of model copies; ``UserError`` if it is not one."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give run folders that cnnlab train wrote")
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; cnnlab serve reads run folders (config.json, metrics.jsonl, "
                        "checkpoints/)")
    read_metrics(path)  # a folder without a finished epoch is refused here, in one line
    inspection = Inspection(run.load(path, device="cpu"))
    name = path.resolve().name
    if name in taken:
        name = f"{name} ({index + 1})"
    taken.add(name)
    for folder in (path / "explore", *(path / "explore" / kind for kind in ("top-images", "maximize", "units"))):
        if folder.is_dir():
            remove_stale(folder)  # what a server stopped mid-write left behind
    served = Served(index, name, inspection, jobs, images)
    inspection.prepare()  # in this thread, before the server's threads share it
    for _ in range(POOL):
        served._pool.put(inspection.on(copy.deepcopy(inspection.model)))
    # Read now, in the calling (main) thread: a dataset not yet in cnnlab's cache is decoded by forked
    # processes, and a fork from one of the server's threads can deadlock on a lock another thread held.
    try:
        inspection.test_set()
    except UserError as e:
        served._test_error = f"the run's test set cannot be read: {e}"
        log.warning("%s: %s; the panels that need it say so", name, served._test_error)
    return served
