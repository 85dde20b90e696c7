"""What every channel of a layer does on the test set, from one pass over it (OpenAI Microscope's unit pages).

:func:`unit_statistics` runs the test set through the model once, to ``layer``, and keeps for every
channel at once:

- its top-k images, ranked by the channel's strongest activation on each, and where that strongest unit is;
- its mean activation per class, from each image's *spatial mean* of the channel's map, and from those the
  class selectivity index of Morcos et al., "On the importance of single directions for generalization",
  ICLR 2018: (μ_max − μ_rest) / (μ_max + μ_rest), μ_max the largest class mean and μ_rest the mean of the
  other classes' means; 0 for a channel that never fires, 1 for one that fires for one class only (the
  index assumes non-negative activations, as after a ReLU);
- a histogram of the spatial-mean activation over the test images, and the largest of them, which a
  maximised image's activation is compared with.

:func:`receptive_fields` gives the input box every unit of a layer sees: its theoretical receptive field,
the pixels that can change it at all, read from the support of the gradient of a network that keeps each
path of the model and none of its zeros (see there). :func:`unit_filters` gives each channel's filter.

Not of the shape of :mod:`cnnlab.viz.shape`: it searches a whole image set, kept as uint8 and prepared a
batch at a time, as :mod:`cnnlab.viz.top_images` does for one channel.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from cnnlab.core.errors import UserError
from cnnlab.core.spec import Preprocess
from cnnlab.viz.layers import forward_until, layer_path, recording, require_feature_maps

__all__ = ["UnitStatistics", "receptive_fields", "selectivity", "unit_filters", "unit_statistics"]


@dataclass
class UnitStatistics:
    """Every channel of ``layer`` over an image set: ``C`` channels, ``K`` top images, ``N`` images."""

    layer: str
    map_size: tuple[int, int]  # (h, w) of the layer's maps
    top_indices: Tensor  # (C, K) into the images, best first
    top_scores: Tensor  # (C, K) the channel's strongest activation on each
    top_where: Tensor  # (C, K, 2) row and column of that strongest unit in the map
    class_means: Tensor  # (C, classes) mean of the spatial-mean activation over each class's images
    selectivity: Tensor  # (C,) Morcos et al.'s class selectivity index of the class means
    histogram: Tensor  # (C, bins) how many images have each spatial-mean activation
    edges: Tensor  # (C, bins + 1) the histogram's bin edges, from the lowest to the highest value
    best_mean: Tensor  # (C,) the highest spatial-mean activation of any image


def selectivity(class_means: Tensor) -> Tensor:
    """Morcos et al.'s class selectivity index of each row of ``class_means`` (C, classes):
    (μ_max − mean of the other classes' μ) / (μ_max + that mean); 0 where both are 0."""
    top = class_means.amax(1)
    rest = (class_means.sum(1) - top) / max(class_means.shape[1] - 1, 1)
    total = top + rest
    return torch.where(total > 0, (top - rest) / total.clamp_min(1e-12), torch.zeros_like(total))


class _TopK:
    """A running top-``k`` over images of every channel's score, with where the score was."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.scores: Tensor | None = None  # (k', C)
        self.indices: Tensor | None = None
        self.where: Tensor | None = None

    def add(self, scores: Tensor, where: Tensor, start: int) -> None:
        indices = torch.arange(start, start + len(scores))[:, None].expand_as(scores)
        if self.scores is not None:
            scores, indices = torch.cat([self.scores, scores]), torch.cat([self.indices, indices])
            where = torch.cat([self.where, where])
        best = scores.topk(min(self.k, len(scores)), dim=0).indices
        self.scores, self.indices = scores.gather(0, best), indices.gather(0, best)
        self.where = where.gather(0, best[..., None].expand(-1, -1, 2))


@torch.inference_mode()
def unit_statistics(model: nn.Module, images: Tensor, labels: Tensor, preprocess: Preprocess, *, layer: str,
                    classes: int, top_k: int = 9, bins: int = 30, batch_size: int = 256,
                    progress: Callable[[float], None] | None = None) -> UnitStatistics:
    """Every channel of ``layer`` over the uint8 ``images`` and their ``labels`` (of ``classes`` classes), in
    one batched pass with a forward hook: see the module's docstring. ``progress`` is told the fraction of
    the images done after each batch."""
    device = next(model.parameters()).device
    top, means = _TopK(top_k), []
    size = None
    with recording(model, [layer], stop=True) as store:
        for start in range(0, len(images), batch_size):
            forward_until(model, preprocess.to_input(images[start:start + batch_size].to(device)), store)
            acts = require_feature_maps(store[layer], layer).float()
            size = tuple(acts.shape[-2:])
            flat = acts.flatten(2)
            strongest, where = flat.max(2)
            top.add(strongest.cpu(), torch.stack([where // size[1], where % size[1]], -1).cpu(), start)
            means.append(flat.mean(2).cpu())
            if progress is not None:
                progress(min(start + batch_size, len(images)) / len(images))
    mean = torch.cat(means)  # (N, C)
    sums = torch.zeros(classes, mean.shape[1], dtype=torch.float64).index_add_(0, labels.long(), mean.double())
    counts = torch.bincount(labels.long(), minlength=classes).clamp_min(1)[:, None]
    class_means = (sums / counts).T.float()
    histogram, edges = _histograms(mean.T, bins)
    return UnitStatistics(layer, size, top.indices.T.contiguous(), top.scores.T.contiguous(),
                          top.where.permute(1, 0, 2).contiguous(), class_means, selectivity(class_means),
                          histogram, edges, mean.amax(0))


def _histograms(values: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Each row of ``values`` (C, N) counted in ``bins`` equal bins from its lowest to its highest value."""
    lo, hi = values.amin(1, keepdim=True), values.amax(1, keepdim=True)
    hi = torch.where(hi > lo, hi, lo + 1)  # a constant channel: one bin holds every image
    steps = torch.linspace(0, 1, bins + 1)[None]
    edges = lo + (hi - lo) * steps
    which = ((values - lo) / (hi - lo) * bins).long().clamp(0, bins - 1)
    counts = torch.zeros(values.shape[0], bins, dtype=torch.long).scatter_add_(1, which, torch.ones_like(which))
    return counts, edges


# --- the receptive field ----------------------------------------------------------------------------------

_PASS_THROUGH = frozenset({"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "silu",
                           "gelu", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "mish", "sigmoid",
                           "tanh", "softplus", "batch_norm", "dropout", "dropout2d"})


class _Support(TorchFunctionMode):
    """The model's paths with every weight positive and nothing that can zero a gradient: each convolution
    averages its window, activations and batch norms pass their input on, max pools average theirs. The
    gradient of a unit is then positive exactly on the pixels some path connects to it."""

    def __torch_function__(self, func: Callable[..., Any], types: tuple[type, ...], args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in _PASS_THROUGH:
            return args[0] if args else kwargs["input"]
        if name == "conv2d":
            x, w = args[0], args[1]
            rest = dict(zip(("stride", "padding", "dilation", "groups"), args[3:]), **kwargs)
            rest.pop("bias", None)
            return F.conv2d(x, torch.full_like(w, 1.0 / w[0].numel()), None, **rest)
        if name in ("max_pool2d", "_max_pool2d", "max_pool2d_with_indices"):
            pool = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), args[1:]), **kwargs)
            if pool.pop("dilation", 1) not in (1, (1, 1)):
                raise UserError("a dilated max pool's receptive field is not computed; choose an earlier layer")
            pool.pop("return_indices", None)
            return F.avg_pool2d(args[0], **pool, count_include_pad=True)
        if name == "adaptive_max_pool2d":
            return F.adaptive_avg_pool2d(args[0], args[1] if len(args) > 1 else kwargs["output_size"])
        return func(*args, **kwargs)


def receptive_fields(model: nn.Module, layer: str, size: int, channels: int = 3,
                     chunk: int = 8) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The receptive field of every unit of ``layer`` on ``size``-pixel inputs: for each row of its maps the
    input rows (first, last + 1) a unit there sees, and the same for each column; unit (i, j) sees the box
    rows[i] × cols[j].

    It is the theoretical field (every pixel that some path of convolutions and pools connects to the unit,
    clipped to the image), found without a per-architecture table: a float64 copy of the model is run
    under :class:`_Support` and a unit's field is where its gradient is not zero. Rows and columns are found
    separately (one backward for the sum of a row's units, one for a column's), which is exact because a
    convolution's or pool's window is a rectangle. A layer behind a global operation (a squeeze-and-
    excitation block) sees the whole image, and that is what it gets.
    """
    copied = copy.deepcopy(model).double().eval()
    x = torch.ones(1, channels, size, size, dtype=torch.float64, device=next(copied.parameters()).device)
    with torch.no_grad(), recording(copied, [layer], stop=True) as store:
        forward_until(copied, x, store)
    h, w = require_feature_maps(store[layer], layer).shape[-2:]
    wanted = [("row", i) for i in range(h)] + [("col", j) for j in range(w)]
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for start in range(0, len(wanted), chunk):
        part = wanted[start:start + chunk]
        inp = x.expand(len(part), -1, -1, -1).clone().requires_grad_(True)
        with torch.enable_grad(), _Support(), recording(copied, [layer], detach=False, stop=True) as store:
            forward_until(copied, inp, store)
            acts = store[layer]
            total = sum(acts[b, :, k, :].sum() if axis == "row" else acts[b, :, :, k].sum()
                        for b, (axis, k) in enumerate(part))
            (grad,) = torch.autograd.grad(total, inp)
        seen = grad.abs().sum(1) > 0  # (B, S, S)
        for b, key in enumerate(part):
            along = seen[b].any(1) if key[0] == "row" else seen[b].any(0)
            found = along.nonzero()[:, 0]
            spans[key] = (int(found.min()), int(found.max()) + 1) if len(found) else (0, size)
    return [spans[("row", i)] for i in range(h)], [spans[("col", j)] for j in range(w)]


def unit_filters(model: nn.Module, layer: str, channels: int) -> tuple[str, Tensor] | None:
    """The convolution that makes ``layer``'s channels, with its weights (channels, in, kh, kw): the layer
    itself where it is a convolution, else the last one inside it with ``channels`` outputs (a residual
    block's last conv, before its batch norm and the shortcut are added); None where there is none."""
    path = layer_path(model, layer)
    found = None
    for sub, module in model.get_submodule(path).named_modules():
        if isinstance(module, nn.Conv2d) and module.out_channels == channels:
            found = (f"{path}.{sub}" if sub else path), module
    if found is None:
        return None
    return found[0], found[1].weight.detach().float().cpu()
