"""What a network gets wrong on a labelled set, and what it takes as typical of each class.

- **Confused pairs** (fastai's ``most_confused``): the off-diagonal cells of the confusion matrix with the
  most images, one direction each (true → predicted): a cat taken for a dog and a dog taken for a cat are
  different mistakes, often of different sizes; each pair also carries its reverse count, so the two
  directions can be added.
- **Top losses** (fastai's ``plot_top_losses``): the images of highest cross-entropy with their given
  label, from the logits as the model gave them (the loss the run reports, not the calibrated softmax).
- **Prototypes and outliers**: per class, the images whose penultimate features point nearest to and
  farthest from the class's mean direction (cosine distance to the mean of the class's unit-length
  features), after prototypical networks' class mean (Snell et al. 2017). Direction, not Euclidean
  distance: a feature's length grows with the network's confidence (correlation 0.50 with the probability
  of the true class on the demo run), so the nearest to the plain mean were the faint images (85% right,
  mean probability 0.61 on the demo run, 4 per class) and the farthest included the most confident ones;
  by direction the nearest are 92.5% right (0.69) and the farthest are the images the representation
  puts outside their class. Ranking by the probability of the class instead would make a class's least
  typical images its top losses again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cnnlab.core.metrics import confusion_cells

__all__ = ["ConfusedPair", "Typical", "confused_pairs", "top_losses", "typical"]


@dataclass
class ConfusedPair:
    true: int
    predicted: int
    count: int  # test images of class `true` predicted as `predicted`
    share: float  # of the true class's images
    reverse: int  # images of `predicted` predicted as `true`
    examples: list[int]  # the first few of them, in test-set order


@dataclass
class Typical:
    """One class's images nearest to and farthest from its mean direction in feature space."""

    label: int
    most: list[int]  # nearest first
    most_distance: list[float]
    least: list[int]  # farthest first
    least_distance: list[float]


def confused_pairs(predictions: Tensor, labels: Tensor, num_classes: int, count: int = 6,
                   examples: int = 6) -> list[ConfusedPair]:
    """The ``count`` (true, predicted) pairs with the most mistakes, most first (ties in class order), with
    the first ``examples`` images of each. Counted from the confusion matrix's nonzero cells, so 100,000
    classes need no square matrix."""
    cells = {(t, p): n for t, p, n in confusion_cells(predictions, labels, num_classes)}
    totals = torch.bincount(labels, minlength=num_classes)
    wrong = sorted(((t, p, n) for (t, p), n in cells.items() if t != p), key=lambda cell: (-cell[2], cell[0], cell[1]))
    pairs = []
    for t, p, n in wrong[:count]:
        where = ((labels == t) & (predictions == p)).nonzero()[:, 0][:examples].tolist()
        pairs.append(ConfusedPair(t, p, n, n / max(int(totals[t]), 1), cells.get((p, t), 0), where))
    return pairs


def top_losses(logits: Tensor, labels: Tensor, count: int = 24) -> tuple[Tensor, Tensor]:
    """The indices of the ``count`` images of highest cross-entropy with their ``labels``, highest first, and
    their losses."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    top = losses.topk(min(count, len(losses)))
    return top.indices, top.values


def typical(features: Tensor, labels: Tensor, num_classes: int, count: int = 4) -> list[Typical]:
    """For each class with images, the ``count`` images whose ``features`` (N, D) are nearest in direction to
    the class's mean direction and the ``count`` farthest, with their cosine distances (0 … 2)."""
    unit = F.normalize(features.double(), dim=1)
    found = []
    for c in range(num_classes):
        members = (labels == c).nonzero()[:, 0]
        if len(members) == 0:
            continue
        own = unit[members]
        distance = 1 - own @ F.normalize(own.mean(0), dim=0)
        k = min(count, len(members))
        near = distance.topk(k, largest=False)
        far = distance.topk(k)
        found.append(Typical(c, members[near.indices].tolist(), near.values.tolist(),
                             members[far.indices].tolist(), far.values.tolist()))
    return found
