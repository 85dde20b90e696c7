"""The learned filters of a convolution, as pictures (Zeiler & Fergus 2014, Fig. 5; Krizhevsky et al. 2012, Fig. 3).

First-layer filters see colour, so each is one RGB tile; deeper filters see feature maps, so each
(filter, input channel) pair is one grayscale tile. Every tile is min–max scaled on its own filter
(:func:`cnnlab.visualize.render.minmax`): the pictures show shape and colour, not magnitude.

Not of the shape of :mod:`cnnlab.viz.shape`: filters are weights, the same whatever the input.
"""

from __future__ import annotations

from torch import Tensor, nn

from cnnlab.viz.layers import first_conv

__all__ = ["conv_filters"]


def conv_filters(model: nn.Module, layer: str = "conv1") -> tuple[str, Tensor]:
    """The weights (out, in, k, k) of the first convolution of ``layer``, with that conv's module path."""
    path, conv = first_conv(model, layer)
    return path, conv.weight.detach().float().cpu()
