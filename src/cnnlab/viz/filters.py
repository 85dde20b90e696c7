"""The learned filters of a convolution, as pictures (Zeiler & Fergus 2014, Fig. 5; Krizhevsky et al. 2012, Fig. 3).

First-layer filters see colour, so each is one RGB tile; deeper filters see feature maps, so each
(filter, input channel) pair is one grayscale tile. Every tile is min–max scaled on its own filter:
the pictures show shape and colour, not magnitude.
"""

from __future__ import annotations

from torch import Tensor, nn

from cnnlab.viz.layers import first_conv
from cnnlab.viz.render import minmax

__all__ = ["conv_filters", "filter_tiles"]


def conv_filters(model: nn.Module, layer: str = "conv1") -> tuple[str, Tensor]:
    """The weights (out, in, k, k) of the first convolution of ``layer``, with that conv's module path."""
    path, conv = first_conv(model, layer)
    return path, conv.weight.detach().float().cpu()


def filter_tiles(weight: Tensor) -> Tensor:
    """Each filter of ``weight`` (out, in, k, k) min–max scaled to [0, 1] over all its values."""
    return minmax(weight)
