"""An opened run, looked inside: :class:`Inspection` runs the methods of :mod:`cnnlab.viz` on it.

The run is opened once; its test set (by :class:`~cnnlab.run.LoadedRun`), its scores and its default
layers are computed once and kept. Images are chosen here (files, test indices, the first ``count``,
spread over the test set) and captioned here, with the model's prediction; defaults (the first conv
layer, the last spatial block, each image's predicted class) are found here. Every method returns a
typed result of :mod:`cnnlab.inspect.results` for a front-end to draw.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab import run as runs
from cnnlab.core.device import pick_device
from cnnlab.core.errors import UserError, one_line
from cnnlab.core.metrics import Scores, score
from cnnlab.core.spec import Preprocess
from cnnlab.inspect import labels
from cnnlab.inspect import units as unit_pages
from cnnlab.inspect.colour import Colours, run_colours
from cnnlab.inspect.registry import TECHNIQUES
from cnnlab.inspect.results import (
    Dreams,
    Embedding,
    Excitations,
    Explanations,
    FeatureMaps,
    Filters,
    Images,
    Inversions,
    LabelIssues,
    Maximisation,
    Mistakes,
    Projections,
    Transfer,
    Units,
)
from cnnlab.inspect.transfer import check_run, transfer
from cnnlab.inspect.whole_set import embed, find_mistakes
from cnnlab.models.summary import summarize
from cnnlab.viz.cam import upsample
from cnnlab.viz.embedding import last_linear
from cnnlab.viz.filters import conv_filters
from cnnlab.viz.inputs import Batch, from_files, from_test_set, parse_target
from cnnlab.viz.invert import feature_distance
from cnnlab.viz.layers import default_layer, feature_layers, first_layer, layer_path, require_feature_maps
from cnnlab.viz.maximize import STEPS, fourier_noise, objective
from cnnlab.viz.sanity import explain
from cnnlab.viz.shape import target_classes
from cnnlab.viz.top_images import top_images

__all__ = ["Inspection", "spread"]

Progress = Callable[[float], None]


def spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (test sets are often ordered by class)."""
    if n <= k:
        return list(range(n))
    return torch.linspace(0, n - 1, k).round().long().tolist()


class Inspection:
    """One run to look inside. :meth:`on` gives the same run on another copy of its model (a model runs
    one thread at a time: the methods hook its layers); the copies share what has been computed."""

    def __init__(self, run: runs.LoadedRun, data_dir: str | None = None) -> None:
        self.run = run
        self.data_dir = data_dir
        self.model: nn.Module = run.model
        self._kept: dict[str, Any] = {}  # shared with the copies of `on`

    @classmethod
    def open(cls, path: str | Path, device: str = "auto", data_dir: str | None = None) -> Inspection:
        """The run folder or checkpoint ``path``, loaded on ``device`` (see :func:`cnnlab.run.load`)."""
        return cls(runs.load(path, device=pick_device(device)), data_dir)

    def on(self, model: nn.Module) -> Inspection:
        """The same run on ``model``, a copy of its model."""
        other = copy.copy(self)
        other.model = model
        return other

    @property
    def classes(self) -> list[str]:
        return self.run.classes

    @property
    def preprocess(self) -> Preprocess:
        return self.run.preprocess

    @property
    def device(self) -> torch.device:
        return self.run.device

    def _keep(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]

    # --- the run --------------------------------------------------------------------------------------

    def test_set(self) -> tuple[Tensor, Tensor]:
        """The uint8 test images and labels the run reported on (read once)."""
        return self.run.test_set(data_dir=self.data_dir)

    def scores(self) -> Scores:
        """The test set scored as the run scored it (flip TTA where it did): computed once. Its
        probabilities are calibrated by the run's temperature, where one is kept. The same pass records
        the input of the last linear layer (``features``, None for a model without one)."""
        def make() -> Scores:
            images, labels = self.test_set()
            last = last_linear(self.model)
            return score(self.model, images.to(self.device), labels.to(self.device), self.preprocess,
                         tta=self.run.tta, temperature=self.run.temperature,
                         features=last[1] if last is not None else None)

        return self._keep("scores", make)

    def summary(self) -> dict[str, Any]:
        """The model's layers as in Table 1, with counted parameters and MACs (:func:`summarize`)."""
        spec = self.run.spec
        return self._keep("summary", lambda: summarize(spec.name, image_size=self.preprocess.size,
                                                       num_classes=spec.num_classes, width=spec.width,
                                                       in_channels=spec.in_channels))

    def probe(self) -> Tensor:
        """One blank input of the run's size: what the default layers are found with."""
        pre = self.preprocess
        return torch.zeros(1, pre.channels, pre.size, pre.size, device=self.device)

    @property
    def first_layer(self) -> str:
        """The layer that reads the image."""
        return self._keep("first", self._layer_finders()["first"])

    @property
    def last_layer(self) -> str:
        """The last spatial feature block: where CAMs and the channel methods look by default."""
        return self._keep("last", self._layer_finders()["last"])

    @property
    def feature_layers(self) -> list[str]:
        """The layers that show feature maps, from the image up to the last spatial block."""
        return self._keep("stages", self._layer_finders()["stages"])

    def prepare(self) -> None:
        """Find now what is kept of the model (its summary and default layers), before threads share it."""
        self.summary()
        for key, find in self._layer_finders().items():
            self._keep(key, find)

    def _layer_finders(self) -> dict[str, Callable[[], Any]]:
        model = self.run.model
        return {"first": lambda: first_layer(model), "last": lambda: default_layer(model, self.probe()),
                "stages": lambda: feature_layers(model, self.probe())}

    def layers(self, names: Sequence[str]) -> list[str]:
        """``names`` checked: an unknown layer fails, by name, before any work is done."""
        for name in names:
            layer_path(self.run.model, name)
        return list(names)

    def targets(self, values: Sequence[str | int]) -> list[int]:
        """Class names or indices as indices (a ``UserError`` for an unknown one)."""
        return [t for t in (parse_target(v, self.classes) for v in values) if t is not None]

    # --- images ---------------------------------------------------------------------------------------

    def images(self, *, files: Sequence[str] = (), indices: Sequence[int] = (), count: int | None = None,
               default: int = 1, spread_out: bool = False) -> Images:
        """Image ``files``, else test images by ``indices``, else ``count`` (or ``default``) test images:
        the first ones, or spread over the test set."""
        if files:
            return self._prepared(from_files(list(files), self.preprocess))
        x, y = self.test_set()
        n = count or default
        chosen = list(indices) or (spread(len(y), n) if spread_out else list(range(n)))
        return self._prepared(from_test_set(x, y, chosen, self.preprocess))

    def _prepared(self, batch: Batch) -> Images:
        x = batch.x.to(self.device)
        with torch.no_grad():
            probs = (self.model(x) / (self.run.temperature or 1.0)).softmax(1).cpu()
        images = Images(x, self.preprocess.to_pixels(x).cpu(), batch.names, batch.labels, probs, [])
        images.captions = [self.caption(images, i) for i in range(len(batch.names))]
        return images

    def pixels(self, pixels: Tensor, names: Sequence[str], labels: Sequence[int | None] | None = None) -> Images:
        """uint8 images (B, C, H, W) of the run's size, as read by :meth:`Preprocess.read` (an upload)."""
        x = self.preprocess.to_input(pixels.to(self.device))
        return self._prepared(Batch(x, list(names), list(labels) if labels is not None else [None] * len(x)))

    def _name(self, c: int) -> str:
        """Class ``c``'s name as captions show it: control characters escaped (a folder name is the user's,
        and a figure's font has no glyph for them)."""
        return one_line(self.classes[c])

    def caption(self, images: Images, i: int, *, name: str | None = None, true: bool = True) -> str:
        """``NAME\\npred CLASS (p)``, and ``\\ntrue CLASS`` where the image's class is known and ``true``."""
        p, c = images.probabilities[i].max(0)
        text = f"{one_line(images.names[i] if name is None else name)}\npred {self._name(int(c))} ({float(p):.2f})"
        if true and images.labels[i] is not None:
            text += f"\ntrue {self._name(images.labels[i])}"
        return text

    # --- the methods ----------------------------------------------------------------------------------

    def explain(self, images: Images, kinds: Sequence[str], *, layer: str | None = None,
                targets: Sequence[int] = (), options: Mapping[str, Mapping[str, Any]] | None = None) -> Explanations:
        """CAMs and attributions ``kinds`` of each image, once per class of ``targets`` (default: once,
        for its predicted class); ``layer`` for those that take one (default: the last spatial block).
        ``options``: kind → options of its function."""
        if targets:
            rows = [i for i in range(len(images.names)) for _ in targets]
            x, t = images.x[rows], torch.tensor(list(targets) * len(images.names), device=images.x.device)
        else:
            rows = list(range(len(images.names)))
            x, t = images.x, target_classes(self.model, images.x, None)
        maps = {}
        for kind in kinds:
            technique = TECHNIQUES[kind]
            given = {"layer": layer} if layer is not None and "layer" in technique.uses else {}
            maps[kind] = technique.function(self.model, x, target=t, **given,
                                            **(options or {}).get(kind, {})).float().cpu()
        captions = []
        for r, i in enumerate(rows):
            text = images.captions[i]
            if int(t[r]) != int(images.probabilities[i].argmax()):
                text += f"\ntarget {self._name(int(t[r]))}"
            captions.append(text)
        return Explanations(images, rows, t.cpu(), layer or self.last_layer, maps,
                            {k: TECHNIQUES[k].signed for k in kinds}, captions)

    def importance(self, images: Images, kind: str, targets: Tensor, layer: str | None = None) -> Tensor:
        """Method ``kind``'s importance per pixel (B, H, W) for ``targets`` (B,): the maps the explanation
        checks measure (the registry's quick options); ``layer`` for those that take one."""
        technique = TECHNIQUES[kind]
        given = {"layer": layer} if layer is not None and "layer" in technique.uses else {}
        return explain(technique.explainer, self.model, images.x, targets.to(images.x.device), **given)

    def channels(self, layer: str) -> int:
        """How many channels ``layer`` outputs (a ``UserError`` if it has no feature maps)."""
        maps = TECHNIQUES["features"].function(self.model, self.probe(), layer=layer)
        if maps.ndim != 4:
            raise UserError(f"{layer} outputs no feature maps; choose a convolutional layer")
        return int(maps.shape[1])

    def features(self, images: Images, layer: str) -> FeatureMaps:
        """Every channel of ``layer`` for each image."""
        maps = TECHNIQUES["features"].function(self.model, images.x, layer=layer)
        return FeatureMaps(images, layer, require_feature_maps(maps.float().cpu(), layer))

    def filters(self, layer: str, channels: Sequence[int] = (0,), rows: int = 32) -> Filters:
        """The weights of ``layer``'s first convolution; ``channels`` to enlarge, ``rows`` filters of a grid."""
        path, weight = conv_filters(self.model, layer)
        bad = [c for c in channels if not 0 <= c < weight.shape[0]]
        if bad:
            raise UserError(f"`channel` {bad[0]} is out of range; {layer} has {weight.shape[0]} filters "
                            f"(0 … {weight.shape[0] - 1})")
        return Filters(layer, path, weight, list(channels), min(weight.shape[0], rows))

    def top_images(self, layer: str, channel: int, count: int = 9, progress: Progress | None = None) -> Excitations:
        """The ``count`` test images on which ``channel`` of ``layer`` fires hardest, best first."""
        images, _ = self.test_set()
        top = top_images(self.model, images, self.preprocess, layer=layer, channel=channel, count=count,
                         progress=progress)
        x = self.preprocess.to_input(images[top.indices])
        heat = upsample(top.maps[:, None].float(), x)[:, 0]
        return Excitations(layer, channel, top.indices, top.scores, top.boxes, self.preprocess.to_pixels(x), heat)

    def deconv(self, images: Images, layer: str, channels: Sequence[int] = (), count: int = 4) -> Projections:
        """Each of ``channels`` (default: the ``count`` strongest on the first image) projected to pixels."""
        acts = require_feature_maps(TECHNIQUES["features"].function(self.model, images.x, layer=layer), layer)
        strongest = acts.flatten(2).amax(2)
        chosen = list(channels) or strongest[0].topk(min(count, acts.shape[1])).indices.tolist()
        project = TECHNIQUES["deconv"].function
        return Projections(images, layer, strongest.cpu(),
                           {c: project(self.model, images.x, layer=layer, channels=c).float().cpu() for c in chosen})

    def invert(self, images: Images, layers: Sequence[str], steps: int = 300) -> Inversions:
        """Each image reconstructed from each layer's representation (Mahendran & Vedaldi 2015)."""
        pixels, distances = {}, {}
        for layer in layers:
            x = TECHNIQUES["invert"].function(self.model, images.x, layer=layer, preprocess=self.preprocess,
                                              steps=steps)
            pixels[layer] = self.preprocess.to_pixels(x).cpu()
            distances[layer] = feature_distance(self.model, x, images.x, layer).tolist()
        return Inversions(images, pixels, distances)

    def colours(self) -> Colours:
        """The colours activation maximisation decorrelates: measured on the run's training images, once."""
        return self._keep("colours", lambda: run_colours(self.run, self.data_dir))

    def check_run(self, path: str | Path) -> runs.LoadedRun:
        """The independently trained run at ``path`` that class models are checked with, opened once (a
        ``UserError`` where it cannot judge them: see :func:`cnnlab.inspect.transfer.check_run`)."""
        return self._keep(f"check {Path(path).resolve()}", lambda: check_run(self.run, path))

    def noise(self, n: int) -> Tensor:
        """``n`` starting images for activation maximisation, as network input."""
        pre = self.preprocess
        pixels = fourier_noise((n, pre.channels, pre.size, pre.size), color=self.colours().sqrt).to(self.device)
        return pre.normalizer().to(pixels)(pixels)

    def _maximize(self, start: Tensor, progress: Progress | None, options: Mapping[str, Any], **goal: Any) -> Tensor:
        return TECHNIQUES["maximize"].function(self.model, start, preprocess=self.preprocess, progress=progress,
                                               **{"color": self.colours().sqrt, **options}, **goal)

    def maximize_classes(self, classes: Sequence[int], steps: int = STEPS, progress: Progress | None = None,
                         check_with: str | Path | None = None, **options: Any) -> Maximisation:
        """Images the network takes for each of ``classes``, with the probability it gives them and, with
        ``check_with``, the probability an independently trained run gives them (:meth:`check_run`).
        ``options``: those of :func:`cnnlab.viz.maximize.maximize`."""
        other = self.check_run(check_with) if check_with is not None else None  # a mistake fails before the work
        x = self._maximize(self.noise(len(classes)), progress, dict(steps=steps, **options), target=list(classes))
        with torch.no_grad():
            probs = self.model(x).softmax(1).cpu()
        pixels = self.preprocess.to_pixels(x).cpu()
        own = probs[torch.arange(len(classes)), torch.tensor(list(classes))]
        check = transfer(other, pixels, classes) if other is not None else None
        labels = [f"{self._name(c)}\np = {float(own[k]):.2f}" + (self._checked(check, k) if check else "")
                  for k, c in enumerate(classes)]
        return Maximisation(None, list(classes), pixels, labels, own, check, self.colours().source)

    def _checked(self, check: Transfer, k: int) -> str:
        """Class model ``k``'s caption line for the check run: its probability, and its top-1 class."""
        top = "top-1" if check.top1[k] else f"top-1 {self._name(int(check.predictions[k]))}"
        return f"\nother run p = {float(check.probabilities[k]):.2f}, {top}"

    def maximize_channels(self, layer: str, channels: Sequence[int], steps: int = STEPS,
                          progress: Progress | None = None) -> Maximisation:
        """Images that maximise each channel's mean activation at ``layer``, with its value before and after."""
        start = self.noise(len(channels))
        x = self._maximize(start, progress, dict(steps=steps), layer=layer, channels=list(channels))
        with torch.no_grad():
            before = objective(self.model, start, layer=layer, channels=list(channels)).cpu()
            after = objective(self.model, x, layer=layer, channels=list(channels)).cpu()
        labels = [f"ch {c}\n{float(b):.2f} → {float(a):.2f}" for c, b, a in zip(channels, before, after)]
        return Maximisation(layer, list(channels), self.preprocess.to_pixels(x).cpu(), labels, after, None,
                            self.colours().source)

    def units(self, layer: str, channels: Sequence[int] = (), *, top_k: int = 9, variants: int = 4, steps: int = 64,
              diversity: float = unit_pages.DIVERSITY, progress: Progress | None = None) -> Units:
        """Unit pages of ``channels`` (default: all) of ``layer``: each one's top test images with the strongest
        unit's receptive field, class means and selectivity, activation histogram, filter, and ``variants``
        diverse activation maximisations (:mod:`cnnlab.inspect.units`)."""
        return unit_pages.units(self, layer, channels, top_k=top_k, variants=variants, steps=steps,
                                diversity=diversity, progress=progress)

    def dream(self, images: Images, layer: str, steps: int = 20) -> Dreams:
        """DeepDream of each image at ``layer``."""
        x = TECHNIQUES["dream"].function(self.model, images.x, layer=layer, preprocess=self.preprocess, steps=steps)
        return Dreams(images, layer, self.preprocess.to_pixels(x).cpu())

    @property
    def dream_layer(self) -> str:
        """Where DeepDream looks by default: the stage before the last, where there are stages."""
        stages = self.feature_layers
        return (stages[-2:-1] if len(stages) > 2 else stages[-1:])[0]

    # --- the whole test set ---------------------------------------------------------------------------

    def embedding(self, count: int | None = None, seed: int = 0) -> Embedding:
        """The test set's penultimate features on a 2-D t-SNE map (``count`` images spread over it; default
        all, at most :data:`cnnlab.inspect.whole_set.MOST`); the same ``seed`` gives the same map."""
        return self._keep(f"embedding:{count}:{seed}", lambda: embed(self, count, seed))

    def mistakes(self) -> Mistakes:
        """The most-confused pairs, the top losses and each class's most and least typical test images."""
        return self._keep("mistakes", lambda: find_mistakes(self))

    # --- the data -------------------------------------------------------------------------------------

    def label_issues(self, folds: int | None = None, progress: Progress | None = None) -> LabelIssues:
        """Training images whose label is likely wrong, by confident learning on out-of-sample probabilities:
        the validation split's, or with ``folds`` K, K-fold cross-validation's on the training split (trains K
        copies of the run; see :mod:`cnnlab.inspect.labels`)."""
        if folds is None:
            return labels.on_validation(self.run, self.data_dir)
        return labels.cross_validated(self.run, folds, self.data_dir, progress)

    def kept_label_issues(self) -> LabelIssues:
        """What ``cnnlab labels`` kept in the run folder for this checkpoint, else :meth:`label_issues` on the
        validation split (computed once; the kept file is read each time, as ``cnnlab labels`` may rewrite it)."""
        return labels.kept(self.run) or self._keep("label-issues", self.label_issues)

    def training_images(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images and labels of the run's dataset at positions ``index`` among its training images."""
        return self.run.training_images(index, self.data_dir)
