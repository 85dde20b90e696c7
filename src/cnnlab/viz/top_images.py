"""The images that excite a channel most, and where (Zeiler & Fergus 2014, Fig. 2; Girshick et al. 2014).

Each image is scored by the channel's strongest activation. The excited region is the effective
receptive field of that strongest unit (Luo et al., "Understanding the Effective Receptive Field in
Deep Convolutional Neural Networks", NeurIPS 2016): the pixels whose gradient on the unit is at
least ``threshold`` of the largest, as a box.

Not of the shape of :mod:`cnnlab.viz.shape`: it searches a whole image set, which is kept as uint8
and prepared a batch at a time (10,000 test images as network input at 224 px would take 6 GB),
for one channel, and it finds images and boxes rather than a map of each image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cnnlab.core.spec import Preprocess
from cnnlab.viz.layers import default_layer, forward_until, recording, require_channel, require_feature_maps

__all__ = ["TopImages", "channel_scores", "excited_regions", "top_images"]


@dataclass
class TopImages:
    indices: Tensor  # (K,) into the images searched
    scores: Tensor  # (K,) the channel's maximum activation on each
    boxes: list[tuple[int, int, int, int]]  # (top, left, bottom, right) in input pixels
    maps: Tensor  # (K, h, w) the channel's activation map on each


def _channel(acts: Tensor, layer: str, channel: int) -> Tensor:
    require_channel(require_feature_maps(acts, layer), layer, channel, param="channel")
    return acts[:, channel]


@torch.no_grad()
def channel_scores(model: nn.Module, images: Tensor, preprocess: Preprocess, *, layer: str, channel: int,
                   batch_size: int = 256, progress: Callable[[float], None] | None = None) -> Tensor:
    """The channel's maximum activation on every uint8 image (N,), in batches; ``progress`` is told the
    fraction of the images done after each batch."""
    device = next(model.parameters()).device
    scores = []
    with recording(model, [layer], stop=True) as store:
        for start in range(0, len(images), batch_size):
            forward_until(model, preprocess.to_input(images[start:start + batch_size].to(device)), store)
            scores.append(_channel(store[layer], layer, channel).flatten(1).amax(1).cpu())
            if progress is not None:
                progress(min(start + batch_size, len(images)) / len(images))
    return torch.cat(scores)


def excited_regions(model: nn.Module, x: Tensor, *, layer: str, channel: int,
                    threshold: float = 0.1) -> tuple[list[tuple[int, int, int, int]], Tensor]:
    """Box around the effective receptive field of the channel's strongest unit, and the channel's map."""
    inp = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), recording(model, [layer], detach=False, stop=True) as store:
        forward_until(model, inp, store)
        maps = _channel(store[layer], layer, channel)
        flat = maps.flatten(1)
        strongest = flat.gather(1, flat.argmax(1, keepdim=True))
        # Images are independent in eval mode, so one backward gives every image's own field.
        (grad,) = torch.autograd.grad(strongest.sum(), inp)
    field = grad.abs().sum(1)
    boxes = []
    for f in field:
        rows, cols = torch.nonzero(f >= threshold * f.max().clamp_min(1e-12), as_tuple=True)
        if len(rows) == 0:
            boxes.append((0, 0, f.shape[0], f.shape[1]))
        else:
            boxes.append((int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1))
    return boxes, maps.detach()


def top_images(model: nn.Module, images: Tensor, preprocess: Preprocess, *, layer: str | None = None,
               channel: int = 0, count: int = 9, progress: Callable[[float], None] | None = None) -> TopImages:
    """The ``count`` uint8 ``images`` on which ``channel`` of ``layer`` (default: the last spatial feature
    block) fires hardest, best first; ``progress`` as for :func:`channel_scores`."""
    layer = layer or default_layer(model, preprocess.to_input(images[:1].to(next(model.parameters()).device)))
    scores = channel_scores(model, images, preprocess, layer=layer, channel=channel, progress=progress)
    best = scores.topk(min(count, len(scores))).indices
    x = preprocess.to_input(images[best].to(next(model.parameters()).device))
    boxes, maps = excited_regions(model, x, layer=layer, channel=channel)
    return TopImages(best, scores[best], boxes, maps.cpu())
