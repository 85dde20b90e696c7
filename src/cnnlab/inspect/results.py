"""What the inspector returns: typed results that the front-ends only draw (PNG, HTML or JSON).

Tensors here are on the CPU, except :attr:`Images.x`, the network input on the run's device. Pictures
are ``pixels``: (…, C, H, W) in [0, 1], what the network sees. The scores of the test set are
:class:`cnnlab.core.metrics.Scores` and the explanation checks :class:`cnnlab.viz.sanity.Sanity`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cnnlab.core.metrics import Scores
from cnnlab.viz.mistakes import ConfusedPair, Typical
from cnnlab.viz.sanity import Sanity

__all__ = ["ConfusedPair", "Dreams", "Embedding", "Excitations", "Explanations", "FeatureMaps", "Filters", "Images",
           "Inversions", "LabelIssues", "Maximisation", "Mistakes", "Projections", "Sanity", "Scores", "Transfer",
           "Typical", "Units"]


@dataclass
class Images:
    """Images prepared as the run was trained, with a short name each (for file names and captions)."""

    x: Tensor  # (B, C, S, S) normalised network input, on the run's device
    pixels: Tensor  # (B, C, S, S) in [0, 1]: what the network sees
    names: list[str]
    labels: list[int | None]  # the true class where known
    probabilities: Tensor  # (B, classes) the model's softmax for each image
    captions: list[str]  # "NAME\npred CLASS (p)", and "\ntrue CLASS" where it is known

    @property
    def tag(self) -> str:
        """The images in a file name: the first one's name, and how many follow it."""
        return self.names[0] if len(self.names) == 1 else f"{self.names[0]}+{len(self.names) - 1}"


@dataclass
class Explanations:
    """CAMs and attributions: one row per (image, target) and one map per method."""

    images: Images
    rows: list[int]  # the image each row shows
    targets: Tensor  # (R,) the class each row explains
    layer: str  # where the CAMs (and guided Grad-CAM) look
    maps: dict[str, Tensor]  # method → (R, 1, H, W) for a CAM, (R, C, H, W) for an attribution
    signed: dict[str, bool]  # method → whether the sign says for or against the class
    captions: list[str]  # per row: the image's caption, and the target where it is not the prediction


@dataclass
class FeatureMaps:
    images: Images
    layer: str
    maps: Tensor  # (B, C, h, w) every channel of the layer for each image


@dataclass
class Filters:
    layer: str
    path: str  # the module path of the layer's first convolution, whose weights these are
    weight: Tensor  # (out, in, kh, kw)
    channels: list[int]  # the filters to show enlarged
    rows: int  # filters shown when they see feature maps (a grid of filters × input channels)


@dataclass
class Excitations:
    """The test images that excite one channel most, and where."""

    layer: str
    channel: int
    indices: Tensor  # (K,) into the test set, best first
    scores: Tensor  # (K,) the channel's maximum activation on each
    boxes: list[tuple[int, int, int, int]]  # (top, left, bottom, right): the strongest unit's receptive field
    pixels: Tensor  # (K, C, H, W)
    heat: Tensor  # (K, H, W) the channel's map, upsampled to the image


@dataclass
class Projections:
    """Deconvnet: each channel's strongest activation projected back to pixels."""

    images: Images
    layer: str
    strongest: Tensor  # (B, C) each channel's maximum activation on each image
    projections: dict[int, Tensor]  # channel → (B, C, H, W) in network-input units


@dataclass
class Inversions:
    images: Images
    pixels: dict[str, Tensor]  # layer → (B, C, H, W) the images reconstructed from its representation
    distances: dict[str, list[float]]  # layer → relative feature distance of each reconstruction


@dataclass
class Transfer:
    """Class models shown to an independently trained run: the probability it gives each its class, and
    whether that class is its top-1. A picture of the class transfers; noise that fools only the network
    it was made on scores at chance."""

    run: str  # the check run's checkpoint
    classes: list[int]  # the class of each class model
    probabilities: Tensor  # (K,) the check run's probability of each one's class
    predictions: Tensor  # (K,) the check run's top-1 class of each

    @property
    def top1(self) -> list[bool]:
        return [int(p) == c for p, c in zip(self.predictions, self.classes)]

    @property
    def mean(self) -> float:
        return float(self.probabilities.mean())

    def summary(self) -> str:
        """``checked with RUN: mean p(target) 0.85, 9 of 10 top-1``."""
        return f"checked with {self.run}: mean p(target) {self.mean:.2f}, {sum(self.top1)} of {len(self.classes)} top-1"

    def to_json(self) -> dict:
        return {"run": self.run, "mean_p_target": self.mean, "top1": sum(self.top1), "n": len(self.classes),
                "p_target": [float(p) for p in self.probabilities], "predicted": self.predictions.tolist(),
                "is_top1": self.top1}


@dataclass
class Maximisation:
    """Images optimised to excite classes (``layer`` None) or channels of a layer."""

    layer: str | None
    units: list[int]  # the classes or channels
    pixels: Tensor  # (K, C, H, W)
    labels: list[str]  # "CLASS\np = 0.97" or "ch C\nbefore → after", one per unit
    values: Tensor | None = None  # (K,) classes: the run's probability of each; channels: the activation reached
    check: Transfer | None = None  # classes: how an independently trained run takes them
    colour: str = ""  # where the colour decorrelation came from

    def to_json(self) -> dict:
        """The units by name (a label's first line), what the run makes of them and, for classes checked with
        another run, what that run makes of them."""
        return {"layer": self.layer, "units": list(self.units), "names": [t.split("\n")[0] for t in self.labels],
                "values": None if self.values is None else [float(v) for v in self.values],
                "check": None if self.check is None else self.check.to_json(), "colour": self.colour}


@dataclass
class Dreams:
    images: Images
    layer: str
    pixels: Tensor  # (B, C, H, W)


@dataclass
class Units:
    """Unit pages of a layer (see :mod:`cnnlab.viz.units` and :mod:`cnnlab.inspect.units`): ``U`` channels,
    ``K`` top test images and ``V`` maximised variants each."""

    layer: str
    classes: list[str]
    channels: list[int]  # (U,) the channels of the layer shown, in order
    count: int  # how many channels the layer has
    map_size: tuple[int, int]  # (h, w) of the layer's maps
    top_indices: Tensor  # (U, K) into the test set, best first by the channel's strongest activation
    top_scores: Tensor  # (U, K) that strongest activation on each
    top_labels: Tensor  # (U, K) each top image's true class
    boxes: Tensor  # (U, K, 4) (top, left, bottom, right): the strongest unit's receptive field, in input pixels
    class_means: Tensor  # (U, classes) mean spatial-mean activation over each class's test images
    selectivity: Tensor  # (U,) Morcos et al.'s class selectivity index
    histogram: Tensor  # (U, bins) test images per bin of the spatial-mean activation
    edges: Tensor  # (U, bins + 1)
    best_mean: Tensor  # (U,) the highest spatial-mean activation of any test image
    variants: Tensor  # (U, V, C, H, W) in [0, 1]: images maximising the channel's mean activation, made diverse
    reached: Tensor  # (U, V) the channel's spatial-mean activation on each variant
    similarity: Tensor  # (U,) mean Gram-matrix cosine similarity between a channel's variants at the layer
    filter_path: str | None  # the convolution that makes the channels, whose weights `filters` are
    filters: Tensor | None  # (U, in, kh, kw)
    steps: int  # of the maximisation
    diversity: float  # the weight of its diversity term

    @property
    def preferred(self) -> Tensor:
        """(U,) the class whose test images excite each channel most on average."""
        return self.class_means.argmax(1)

    @property
    def quality(self) -> Tensor:
        """(U,) the maximisation's quality: the variants' mean activation over the best test image's."""
        return self.reached.mean(1) / self.best_mean.where(self.best_mean > 0, float("nan"))


@dataclass
class Embedding:
    """Test images placed on a 2-D map by their penultimate features (the input of the last linear layer)."""

    layer: str  # the module path of the last linear layer
    method: str  # how the map was made (cnnlab.viz.embedding.TSNE)
    seed: int
    classes: list[str]
    indices: Tensor  # (N,) into the test set
    features: Tensor  # (N, D) what was embedded
    points: Tensor  # (N, 2)
    labels: Tensor  # (N,) the true class
    predictions: Tensor  # (N,)
    probabilities: Tensor  # (N,) the (calibrated) probability of each prediction
    shown: list[int]  # rows drawn as thumbnails: a spread over the map
    pixels: Tensor  # (len(shown), C, H, W) those images as the network sees them

    def to_json(self) -> dict:
        """Everything but the features and pixels, as plain values (the explorer's map)."""
        return {"layer": self.layer, "method": self.method, "seed": self.seed, "classes": self.classes,
                "dims": int(self.features.shape[1]), "indices": self.indices.tolist(),
                "points": [[round(float(x), 4), round(float(y), 4)] for x, y in self.points.tolist()],
                "labels": self.labels.tolist(), "predictions": self.predictions.tolist(),
                "probabilities": [round(float(p), 4) for p in self.probabilities.tolist()]}


@dataclass
class Loss:
    index: int  # into the test set
    label: int
    prediction: int
    loss: float  # cross-entropy with the label, from the logits
    probability: float  # of the prediction (calibrated where the run keeps a temperature)
    label_probability: float  # of the given label (calibrated likewise)


@dataclass
class Mistakes:
    """What the network gets wrong on the test set, and what it takes as typical of each class."""

    classes: list[str]
    n: int  # test images
    wrong: int  # of them misclassified
    pairs: list[ConfusedPair]  # most-confused (true, predicted) pairs, most first
    losses: list[Loss]  # highest first
    typical: list[Typical]  # per class with images: nearest to and farthest from its mean feature direction
    layer: str | None  # where the features of `typical` are read (the last linear layer's input); None: none

    def to_json(self) -> dict:
        return {"classes": self.classes, "n": self.n, "wrong": self.wrong, "layer": self.layer,
                "pairs": [vars(p) for p in self.pairs], "losses": [vars(x) for x in self.losses],
                "typical": [vars(t) for t in self.typical]}


@dataclass
class LabelIssues:
    """Training images whose given label is likely wrong (confident learning, Northcutt et al. 2021), found
    from out-of-sample probabilities: the validation split's, or K-fold cross-validation's on the training split.

    The candidates are ordered most likely wrong first (lowest self-confidence: the out-of-sample probability
    of the given label). ``index`` names each by its position among the dataset's training images.
    """

    source: str  # "validation" or "cross-validation"
    folds: int | None  # K of the cross-validation
    classes: list[str]
    examined: int  # images whose labels were examined
    index: Tensor  # (K,) positions among the dataset's training images
    given: Tensor  # (K,) the label the dataset gives
    suggested: Tensor  # (K,) the class the out-of-sample probabilities favour
    self_confidence: Tensor  # (K,) the out-of-sample probability of the given label
    suggested_probability: Tensor  # (K,) … and of the suggested class
    confident_joint: Tensor  # (classes, classes): images given label i (row) confidently of class j (column)
    fold_accuracy: list[float] = field(default_factory=list)  # each fold model's top-1 on the images it held out
    stamp: dict[str, Any] = field(default_factory=dict)  # the checkpoint the result belongs to
    file: str | None = None  # the label_issues.json it was read from; None when computed here

    def to_json(self) -> dict[str, Any]:
        """The result as ``label_issues.json`` holds it and ``cnnlab labels --json`` prints it."""
        issues = [{"rank": r + 1, "index": int(i), "given": self.classes[int(g)], "given_class": int(g),
                   "suggested": self.classes[int(s)], "suggested_class": int(s), "self_confidence": float(c),
                   "suggested_probability": float(p)}
                  for r, (i, g, s, c, p) in enumerate(zip(self.index, self.given, self.suggested, self.self_confidence,
                                                          self.suggested_probability))]
        return {"source": self.source, "folds": self.folds, "examined": self.examined, "found": len(issues),
                "method": "cleanlab.filter.find_label_issues (prune_by_noise_rate), ranked by self_confidence",
                "classes": list(self.classes), "confident_joint": self.confident_joint.tolist(),
                "fold_accuracy": list(self.fold_accuracy), "stamp": dict(self.stamp), "issues": issues}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LabelIssues:
        """The result :meth:`to_json` wrote (a ``KeyError``, ``TypeError`` or ``ValueError`` if it is not one)."""
        issues = d["issues"]

        def column(key: str, dtype: torch.dtype) -> Tensor:
            return torch.tensor([x[key] for x in issues], dtype=dtype)

        return cls(str(d["source"]), d["folds"], [str(c) for c in d["classes"]], int(d["examined"]),
                   column("index", torch.long), column("given_class", torch.long),
                   column("suggested_class", torch.long), column("self_confidence", torch.float64),
                   column("suggested_probability", torch.float64),
                   torch.tensor(d["confident_joint"], dtype=torch.long), [float(a) for a in d["fold_accuracy"]],
                   dict(d["stamp"]))
