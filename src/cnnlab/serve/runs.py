"""A run as the explorer serves it: its model, its test set, and what each panel asks of them.

Nothing is computed here that cnnlab does not already compute elsewhere: predictions come from
:func:`cnnlab.predict.ranked`, explanations from :func:`cnnlab.viz.sanity.explain` (the maps the trust
scores are measured on), feature maps, filters, top images and activation maximisation from
:mod:`cnnlab.viz`, curves from the report's charts, scores from :func:`cnnlab.core.metrics.score`.
This module picks the inputs, turns tensors into PNGs and says which results are heavy jobs.

Forward hooks are registered on the model by most methods, so two threads must never run one model
object at once. Each run therefore keeps a small pool of copies for the interactive requests (a
request takes a free copy, or waits for one in its own thread, never on the event loop), and one more
copy for the background worker, so that a long job never holds a copy a request needs.
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
from torch import Tensor, nn

from cnnlab import run
from cnnlab.core.errors import UserError
from cnnlab.core.files import remove_stale
from cnnlab.core.images import UPLOAD_DECODED_BYTES, TooLarge
from cnnlab.core.metrics import confusion_matrix, score
from cnnlab.models.summary import summarize
from cnnlab.predict import ranked
from cnnlab.report import charts
from cnnlab.report.sections import (
    SANITY_DELETION_STEPS,
    SANITY_IMAGES,
    SANITY_ROAD_FRACTIONS,
    SANITY_STEPS,
    read_metrics,
)
from cnnlab.serve.jobs import Jobs, Progress, Status, Task
from cnnlab.serve.store import Image, ImageStore
from cnnlab.viz import render
from cnnlab.viz.cam import CAMS
from cnnlab.viz.features import feature_maps
from cnnlab.viz.filters import conv_filters
from cnnlab.viz.layers import default_layer, feature_layers, layer_path
from cnnlab.viz.maximize import fourier_noise, maximize
from cnnlab.viz.sanity import EXPLAINERS, explain, sanity_checks
from cnnlab.viz.top_images import top_images

__all__ = ["METHODS", "Served", "open_run"]

log = logging.getLogger(__name__)

TOP_K = 5
POOL = 2  # model copies for interactive requests, per run
TOP_IMAGES = 9  # per channel
MAXIMIZE_STEPS = 256  # as `cnnlab visualize maximize`
BROWSE = 60  # thumbnails per list of test images
MAX_CHANNELS = 1024  # feature maps sent for one layer
# The methods that take a layer: the CAMs and guided Grad-CAM (see cnnlab.viz.attribute); the other
# attributions work on the input alone.
LAYERED = frozenset(CAMS) | {"guided-grad-cam"}
METHODS = list(EXPLAINERS)


def png(rgb: np.ndarray) -> str:
    """RGB (H, W, 3) or gray (H, W) in [0, 1] as a PNG data URI at its own size (the page enlarges it
    pixel for pixel); the report's :func:`cnnlab.report.charts.thumbnail` encodes it."""
    a = np.clip(np.rint(np.asarray(rgb, dtype=np.float32) * 255), 0, 255).astype(np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return charts.thumbnail(torch.from_numpy(np.ascontiguousarray(a)), most=max(a.shape[1:]))


def _stamp_of(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"checkpoint": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


@dataclass
class Served:
    """One run folder given to ``cnnlab serve``."""

    index: int
    name: str
    loaded: run.LoadedRun
    jobs: Jobs
    images: ImageStore
    summary: dict[str, Any]
    layers: list[str]  # the layers whose feature maps a CAM can use, from the image up
    default_layer: str
    _pool: queue.Queue[nn.Module] = field(default_factory=queue.Queue, repr=False)
    _worker_model: nn.Module | None = field(default=None, repr=False)
    _test_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _curves: list[dict[str, str]] | None = field(default=None, repr=False)
    _test_error: str | None = field(default=None, repr=False)  # why the test set cannot be read, if it cannot

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
    def model(self) -> Iterator[nn.Module]:
        """A copy of the model no other request is using (waits for one in this thread)."""
        m = self._pool.get()
        try:
            yield m
        finally:
            self._pool.put(m)

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
        """The image ``ref`` names: ``u-<id>`` an upload, ``t<run>-<index>`` a test image of a served run."""
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

    def _input(self, image: Image) -> Tensor:
        return self.loaded.preprocess.to_input(image.pixels[self.index][None].to(self.loaded.device))

    def _seen(self, x: Tensor) -> np.ndarray:
        """What the network sees, as RGB in [0, 1]."""
        return render.image(self.loaded.preprocess.to_pixels(x)[0])

    # --- the panels ---------------------------------------------------------------------------------

    def predict(self, image: Image, tta: bool | None) -> dict[str, Any]:
        tta = self.loaded.tta if tta is None else tta
        x = self._input(image)
        with self.model() as m:
            (top,) = ranked(m, self.classes, x, TOP_K, tta)
        for t in top:
            t["percent"] = f"{100 * t['prob']:.1f}%"  # as `cnnlab predict` prints it
        size = self.loaded.preprocess.size
        return {"run": self.index, "image": image.name, "label": image.label, "tta": tta, "top": top,
                "input": png(self._seen(x)), "size": f"{size}×{size}"}

    def explain(self, image: Image, method: str, target: int | None, layer: str | None) -> dict[str, Any]:
        if method not in EXPLAINERS:
            raise UserError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
        if target is not None and not 0 <= target < len(self.classes):
            raise UserError(f"class {target} is out of range (0 … {len(self.classes) - 1})")
        options: dict[str, Any] = {}
        if method in LAYERED:
            options["layer"] = layer or self.default_layer
            layer_path(self.loaded.model, options["layer"])  # an unknown name is a UserError
        x = self._input(image)
        with self.model() as m:
            if target is None:  # the class the page shows first: the top-1, scored as the run scores
                target = ranked(m, self.classes, x, 1, self.loaded.tta)[0][0]["index"]
            t = torch.tensor([target])
            importance = explain(method, m, x, t.to(x.device), **options)
        panel = render.Panel(importance[0].float().cpu().numpy(), under=self._seen(x),
                             symmetric=EXPLAINERS[method].signed)
        return {"run": self.index, "method": method, "target": int(t[0]), "label": self.classes[int(t[0])],
                "layer": options.get("layer"), "picture": png(render.rgb(panel))}

    def features(self, image: Image, layer: str) -> dict[str, Any]:
        x = self._input(image)
        with self.model() as m:
            maps = feature_maps(m, x, layer=layer)[0].float().cpu()
        if maps.ndim != 3:
            raise UserError(f"{layer} outputs {list(maps.shape)}, not feature maps; choose a convolutional layer")
        shown = maps[:MAX_CHANNELS].numpy()
        lo, hi = float(shown.min()), float(shown.max())  # one range for all, so brightness compares
        tiles = [png(render.colorize(c, render.ACTIVATION, lo, hi)) for c in shown]
        return {"layer": layer, "shape": list(maps.shape), "range": [lo, hi], "tiles": tiles,
                "shown": len(tiles)}

    def channels_of(self, layer: str) -> int:
        """How many channels ``layer`` outputs (a UserError if it has no feature maps)."""
        pre = self.loaded.preprocess
        probe = torch.zeros(1, pre.channels, pre.size, pre.size, device=self.loaded.device)
        with self.model() as m:
            maps = feature_maps(m, probe, layer=layer)
        if maps.ndim != 4:
            raise UserError(f"{layer} outputs no feature maps; choose a convolutional layer")
        return int(maps.shape[1])

    def filters(self, layer: str, channel: int) -> dict[str, Any] | None:
        """The weights of the layer's first convolution for output ``channel``, when that convolution has
        as many outputs as the layer (its channel is then the layer's own for a conv layer)."""
        try:
            path, weight = conv_filters(self.loaded.model, layer)
        except UserError:
            return None
        if channel >= weight.shape[0]:
            return None
        w = render.minmax(weight[channel:channel + 1])[0]  # min–max over this filter, as `visualize filters`
        if w.shape[0] == 3:
            tiles = [png(w.permute(1, 2, 0).numpy())]
        else:
            tiles = [png(render.colorize(c.numpy(), "gray", 0.0, 1.0)) for c in w[:64]]
        return {"conv": path, "shape": list(weight.shape[1:]), "tiles": tiles, "inputs": int(weight.shape[1])}

    def test_thumbnails(self, indices: list[int]) -> list[dict[str, Any]]:
        """Test images as thumbnails with their true class and the reference the page picks them by."""
        images, labels = self.test_set()
        return [{"thumb": charts.thumbnail(images[i]), "label": self.classes[int(labels[i])],
                 "ref": f"t{self.index}-{i}"} for i in indices]

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
        stamp = {"kind": kind, **_stamp_of(self.loaded.path), **params}
        key = f"{self.index}:{kind}:" + ":".join(f"{k}={v}" for k, v in params.items())
        return Task(key, self.explore / file, stamp, compute)

    def _worker(self) -> nn.Module:
        # Only the worker thread uses this copy.
        if self._worker_model is None:
            self._worker_model = copy.deepcopy(self.loaded.model)
        return self._worker_model

    def scores(self) -> Status:
        """The test set's predictions and their confidence (for the confusion matrix and browsing)."""
        tta = self.loaded.tta

        def compute(progress: Progress) -> dict[str, Any]:
            images, labels = self.test_set()
            s = score(self._worker(), images.to(self.loaded.device), labels.to(self.loaded.device),
                      self.loaded.preprocess, tta=tta)
            assert s.confidence is not None
            return {"predictions": s.predictions.tolist(), "labels": s.labels.tolist(),
                    "confidence": s.confidence.tolist(), "top1": s.top1}

        return self.jobs.request(self._job("scores", {"tta": tta}, "scores.json", compute))

    def top_images(self, layer: str, channel: int) -> Status:
        def compute(progress: Progress) -> dict[str, Any]:
            images, labels = self.test_set()
            found = top_images(self._worker(), images, self.loaded.preprocess, layer=layer, channel=channel,
                               count=TOP_IMAGES, progress=progress)
            return {"indices": found.indices.tolist(), "scores": found.scores.tolist(),
                    "boxes": [list(b) for b in found.boxes], "size": self.loaded.preprocess.size}

        return self.jobs.request(self._job("top-images", {"layer": layer, "channel": channel},
                                           f"top-images/{_file_part(layer)}-{channel}.json", compute))

    def maximized(self, layer: str, channel: int) -> Status:
        def compute(progress: Progress) -> dict[str, Any]:
            pre = self.loaded.preprocess
            pixels = fourier_noise((1, pre.channels, pre.size, pre.size)).to(self.loaded.device)
            x = maximize(self._worker(), pre.normalizer().to(pixels)(pixels), layer=layer, channels=channel,
                         preprocess=pre, steps=MAXIMIZE_STEPS, progress=progress)
            return {"picture": png(self._seen(x)), "steps": MAXIMIZE_STEPS}

        return self.jobs.request(self._job("maximize", {"layer": layer, "channel": channel, "steps": MAXIMIZE_STEPS},
                                           f"maximize/{_file_part(layer)}-{channel}.json", compute))

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
            images, _ = self.test_set()
            picks = torch.linspace(0, len(images) - 1, min(SANITY_IMAGES, len(images))).round().long()
            x = self.loaded.preprocess.to_input(images[picks].to(self.loaded.device))
            window = max(2, self.loaded.preprocess.size // 8)  # occlusion without overlap, as the report
            names = list(EXPLAINERS)
            done = [0]

            def say(message: str) -> None:  # about one message per method and cascade step
                done[0] += 1
                progress(min(0.95, done[0] / (2 * len(names) + 4)))

            result = sanity_checks(self._worker(), x, layers=SANITY_STEPS, deletion_steps=SANITY_DELETION_STEPS,
                                   road_fractions=SANITY_ROAD_FRACTIONS, options={"occlusion": {"stride": window}},
                                   progress=say)
            return {"source": f"checks on {len(x)} test images (as in the report)",
                    "methods": _verdicts(result.to_json())}

        stamp_file = full.stat().st_mtime_ns if full.is_file() else None
        return self.jobs.request(self._job("trust", {"sanity": stamp_file}, "trust.json", compute))


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
    loaded = run.load(path, device="cpu")
    spec, pre = loaded.spec, loaded.preprocess
    summary = summarize(spec.name, image_size=pre.size, num_classes=spec.num_classes, width=spec.width,
                        in_channels=spec.in_channels)
    probe = torch.zeros(1, pre.channels, pre.size, pre.size)
    name = path.resolve().name
    if name in taken:
        name = f"{name} ({index + 1})"
    taken.add(name)
    for folder in (path / "explore", path / "explore" / "top-images", path / "explore" / "maximize"):
        if folder.is_dir():
            remove_stale(folder)  # what a server stopped mid-write left behind
    served = Served(index, name, loaded, jobs, images, summary, feature_layers(loaded.model, probe),
                    default_layer(loaded.model, probe))
    for _ in range(POOL):
        served._pool.put(copy.deepcopy(loaded.model))
    # Read now, in the calling (main) thread: a dataset not yet in cnnlab's cache is decoded by forked
    # processes, and a fork from one of the server's threads can deadlock on a lock another thread held.
    try:
        loaded.test_set()
    except UserError as e:
        served._test_error = f"the run's test set cannot be read: {e}"
        log.warning("%s: %s; the panels that need it say so", name, served._test_error)
    return served
