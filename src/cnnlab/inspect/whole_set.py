"""What is read from the whole test set at once: its embedding and its mistakes.

Both start from the inspector's one scoring pass (:meth:`Inspection.scores`), which also records each
image's penultimate features, so neither runs the network again; the methods themselves are
:mod:`cnnlab.viz.embedding` and :mod:`cnnlab.viz.mistakes`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cnnlab.core.errors import UserError
from cnnlab.inspect.results import Embedding, Loss, Mistakes
from cnnlab.viz.embedding import TSNE, last_linear, spread_points, tsne
from cnnlab.viz.mistakes import confused_pairs, top_losses, typical

if TYPE_CHECKING:
    from cnnlab.inspect.inspector import Inspection

__all__ = ["MOST", "PAIRS", "PAIR_EXAMPLES", "TOP_LOSSES", "TYPICAL", "embed", "find_mistakes", "penultimate"]

MOST = 10_000  # images embedded at most (a spread of a larger test set): t-SNE takes about 40 s for them on 2 cores
PAIRS = 6  # most-confused pairs
PAIR_EXAMPLES = 6  # images of each
TOP_LOSSES = 24
TYPICAL = 4  # most and least typical images per class
GRID = 8  # the static map's thumbnails: at most one per cell of a GRID × GRID division


def penultimate(inspection: Inspection) -> tuple[str, Tensor]:
    """The module path of the last linear layer and its input for every test image (N, D)."""
    found = last_linear(inspection.model)
    features = inspection.scores().features
    if found is None or features is None:
        raise UserError(f"{inspection.run.spec.name} has no linear layer whose input could be embedded")
    return found[0], features


def embed(inspection: Inspection, count: int | None, seed: int) -> Embedding:
    """:meth:`Inspection.embedding`."""
    from cnnlab.inspect.inspector import spread

    if count is not None and count < 1:
        raise UserError(f"`count` must be at least 1 (got {count})")
    layer, features = penultimate(inspection)
    scores = inspection.scores()
    assert scores.probabilities is not None
    chosen = torch.tensor(spread(len(features), min(count or MOST, MOST)), dtype=torch.long)
    points = tsne(features[chosen], seed)
    shown = spread_points(points, GRID)
    images, _ = inspection.test_set()
    pre = inspection.preprocess
    pixels = pre.to_pixels(pre.to_input(images[chosen[shown]].to(inspection.device))).cpu()
    return Embedding(layer, TSNE, seed, list(inspection.classes), chosen, features[chosen], points,
                     scores.labels[chosen], scores.predictions[chosen], scores.probabilities[chosen].amax(1),
                     shown, pixels)


def find_mistakes(inspection: Inspection) -> Mistakes:
    """:meth:`Inspection.mistakes`; a model without a linear layer gets no typical images (``layer`` None)."""
    scores = inspection.scores()
    assert scores.logits is not None and scores.probabilities is not None
    k = len(inspection.classes)
    labels, predictions, probs = scores.labels, scores.predictions, scores.probabilities
    indices, values = top_losses(scores.logits, labels, TOP_LOSSES)
    losses = [Loss(i, int(labels[i]), int(predictions[i]), float(v), float(probs[i].max()), float(probs[i, labels[i]]))
              for i, v in zip(indices.tolist(), values.tolist())]
    found = last_linear(inspection.model)
    layer = found[0] if found is not None and scores.features is not None else None
    extremes = typical(scores.features, labels, k, TYPICAL) if layer is not None else []
    return Mistakes(list(inspection.classes), len(labels), int((predictions != labels).sum()),
                    confused_pairs(predictions, labels, k, PAIRS, PAIR_EXAMPLES), losses, extremes, layer)
