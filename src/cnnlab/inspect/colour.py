"""The colours of activation maximisation, measured on the images the run trained on.

Feature visualisation optimises colours decorrelated by the square root of the colour covariance
(Olah et al. 2017; lucid's ``color_correlation_svd_sqrt``). Lucid's is a constant measured on
ImageNet; a run trained on other images has other colours, so the inspector measures them on the
run's own training images, once (:func:`cnnlab.viz.maximize.color_sqrt`), and falls back to
ImageNet's where those images cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cnnlab.core.errors import UserError
from cnnlab.run import LoadedRun
from cnnlab.viz.maximize import color_sqrt

__all__ = ["MAX_PIXELS", "Colours", "run_colours"]

# Image positions read at most (spread over the training set): all of CIFAR-10's at 32 px, a thousand
# images at 224 px. A 3×3 covariance is settled long before.
MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class Colours:
    """The square root of a colour covariance, and where it was measured."""

    sqrt: Tensor | None  # (C, C); None: ImageNet's (cnnlab.viz.maximize.IMAGENET_COLOR_SQRT)
    source: str  # e.g. "the run's 4500 training images"


def run_colours(run: LoadedRun, data_dir: str | None = None) -> Colours:
    """The colour covariance's square root of ``run``'s training images, or ImageNet's where they cannot be read."""
    try:
        images, _ = run.training_set(data_dir)
    except UserError as e:
        return Colours(None, f"ImageNet's colours (the run's training images could not be read: {e})")
    n, channels, h, w = images.shape
    if channels != run.preprocess.channels or n == 0:
        return Colours(None, f"ImageNet's colours (the training images have {channels} channels, the run "
                             f"{run.preprocess.channels})")
    most = max(1, MAX_PIXELS // (h * w))
    if n > most:
        images = images[torch.linspace(0, n - 1, most).round().long()]
    return Colours(color_sqrt(images), f"the colours of the run's {min(n, most)} training images")
