"""Unit pages: everything a page about one channel of a layer shows, for every channel of it at once.

One pass over the test set gives every channel's top images, class means and selectivity and its
histogram (:func:`cnnlab.viz.units.unit_statistics`); the receptive fields of the layer's units are
computed once (:func:`cnnlab.viz.units.receptive_fields`) and boxed around each top image's strongest
unit; the diverse activation maximisation optimises a chunk of channels at a time, ``variants`` images per
channel in one batch with lucid's diversity term between a channel's images
(:func:`cnnlab.viz.maximize.maximize`). Nothing runs per unit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from cnnlab.core.errors import UserError
from cnnlab.inspect.results import Units
from cnnlab.viz.features import feature_maps
from cnnlab.viz.maximize import gram_similarity, maximize, objective
from cnnlab.viz.units import receptive_fields, unit_filters, unit_statistics

if TYPE_CHECKING:
    from cnnlab.inspect.inspector import Inspection

__all__ = ["CHUNK", "DIVERSITY", "units"]

Progress = Callable[[float], None]
DIVERSITY = 2.0  # the weight of lucid's diversity term (the README's dossier section says how it was chosen)
CHUNK = 32  # channels maximised in one batch (times their variants)
STATISTICS = 0.1  # the share of the progress the pass over the test set and the receptive fields take


def units(inspection: Inspection, layer: str, channels: Sequence[int] = (), *, top_k: int = 9, variants: int = 4,
          steps: int = 64, diversity: float = DIVERSITY, progress: Progress | None = None) -> Units:
    """The unit pages of ``channels`` (default: every channel) of ``layer`` on the run's test set: see the
    module's docstring. ``progress`` is told the fraction done."""
    for name, value, least in (("top_k", top_k, 1), ("variants", variants, 1), ("steps", steps, 0)):
        if value < least:
            raise UserError(f"`{name}` must be at least {least} (got {value})")
    count = inspection.channels(layer)
    bad = [c for c in channels if not 0 <= c < count]
    if bad:
        raise UserError(f"`units`: channel {bad[0]} is out of range; {layer} has {count} channels (0 … {count - 1})")
    chosen = list(channels) or list(range(count))
    images, labels = inspection.test_set()
    model, pre = inspection.model, inspection.preprocess
    stats = unit_statistics(model, images, labels, pre, layer=layer, classes=len(inspection.classes), top_k=top_k,
                            progress=(lambda f: progress(STATISTICS * f)) if progress else None)
    rows, cols = receptive_fields(model, layer, pre.size, pre.channels)
    pick = torch.tensor(chosen)
    where = stats.top_where[pick]
    boxes = torch.tensor([[[rows[i][0], cols[j][0], rows[i][1], cols[j][1]] for i, j in unit.tolist()]
                          for unit in where]).reshape(len(chosen), -1, 4)
    pixels, reached, similarity = _maximise(inspection, layer, chosen, variants, steps, diversity, progress)
    found = unit_filters(model, layer, count)
    return Units(layer, list(inspection.classes), chosen, count, stats.map_size, stats.top_indices[pick],
                 stats.top_scores[pick], labels[stats.top_indices[pick]].long(), boxes, stats.class_means[pick],
                 stats.selectivity[pick], stats.histogram[pick], stats.edges[pick], stats.best_mean[pick], pixels,
                 reached, similarity, found[0] if found else None, found[1][pick] if found else None, steps, diversity)


def _maximise(inspection: Inspection, layer: str, chosen: list[int], variants: int, steps: int, diversity: float,
              progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``variants`` images per channel, a chunk of channels per batch: their pixels (U, V, C, H, W), the
    activation each reaches (U, V), and each channel's mean pairwise Gram similarity (U,)."""
    model, pre = inspection.model, inspection.preprocess
    pixels, reached, similarity = [], [], []
    for start in range(0, len(chosen), CHUNK):
        part = chosen[start:start + CHUNK]
        picks = [c for c in part for _ in range(variants)]

        def told(f: float, start: int = start, n: int = len(part)) -> None:
            if progress is not None:
                progress(STATISTICS + (1 - STATISTICS) * (start + f * n) / len(chosen))

        x = maximize(model, inspection.noise(len(picks)), layer=layer, channels=picks, preprocess=pre, steps=steps,
                     diversity=diversity, color=inspection.colours().sqrt, progress=told)
        with torch.no_grad():
            reached.append(objective(model, x, layer=layer, channels=picks).cpu().reshape(len(part), variants))
            similarity.append(_similarity(inspection, x, layer, torch.tensor(picks), variants).reshape(len(part), -1)
                              .mean(1))
        pixels.append(pre.to_pixels(x).cpu().reshape(len(part), variants, *x.shape[1:]))
    return torch.cat(pixels), torch.cat(reached), torch.cat(similarity)


def _similarity(inspection: Inspection, x: torch.Tensor, layer: str, groups: torch.Tensor,
                variants: int) -> torch.Tensor:
    """Each image's mean Gram cosine similarity with the other variants of its channel (0 for one variant)."""
    if variants == 1:
        return torch.zeros(len(x))
    acts = feature_maps(inspection.model, x, layer=layer)
    return (gram_similarity(acts, groups.to(acts.device)) * variants / (variants - 1)).cpu()
