"""Data-dependent and identity initialisations of a network's convolutions (airbench, Jordan 2024).

- :func:`whiten_first_conv`: the first convolution's filters become the eigenvectors of the covariance of
  the training images' patches (of the filter's size), each divided by the square root of its eigenvalue
  plus ``eps``, together with their negatives. On those patches the filters' outputs are then decorrelated
  and of unit variance (``λ / (λ + eps)``, so 1 for every direction of variance far above ``eps``): the
  next layers see whitened inputs from the first step. The filters stay fixed; the bias (if any) trains,
  for the first ``whiten_bias_epochs`` epochs in airbench.
- :func:`dirac_init`: every later convolution starts as the identity on its first input channels (its
  first ``in_channels`` filters pass one input channel each through unchanged), an implicit shortcut.

The covariance is airbench's: the uncentred second moment of the normalised patches (their mean is near 0).
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.core.errors import UserError
from cnnlab.models.anatomy import first_conv_path

__all__ = ["WHITEN_EPS", "WHITEN_IMAGES", "dirac_init", "first_conv", "patch_moment", "patches", "whiten_first_conv",
           "whitening_filters"]

WHITEN_EPS = 5e-4  # airbench's: keeps the filters of directions with almost no variance from blowing up
WHITEN_IMAGES = 5000  # airbench estimates the covariance on the first 5,000 training images


def patches(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Every ``size`` patch of the float images ``x`` (N, C, H, W) at stride 1, as (P, C·h·w) rows."""
    h, w = size
    c = x.shape[1]
    return x.unfold(2, h, 1).unfold(3, w, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * h * w)


def patch_moment(x: torch.Tensor, size: tuple[int, int], chunk: int = 256) -> torch.Tensor:
    """The second moment (D, D) of every ``size`` patch of the images ``x``, summed in float64 a ``chunk`` of
    images at a time (5,000 images' 2×2 patches would take half a GB at once)."""
    total, count = None, 0
    for i in range(0, len(x), chunk):
        rows = patches(x[i:i + chunk].double(), size)
        part = rows.T @ rows
        total, count = (part if total is None else total + part), count + len(rows)
    assert total is not None, "no images to whiten"
    return total / count


def whitening_filters(moment: torch.Tensor, eps: float = WHITEN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The whitening filters of patches whose second moment is ``moment`` (D, D), the largest eigenvalue
    first, as (D, D) rows, and the eigenvalues (D,), in float64."""
    values, vectors = torch.linalg.eigh(moment.double())  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    return vectors.T / (values.clamp(min=0) + eps).sqrt().unsqueeze(1), values


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The convolution that reads the image, refused in one line when whitening cannot apply to it."""
    path = first_conv_path(model)
    if path is None:
        raise UserError("`whiten` initialises the first convolution, and the model has none")
    conv = model.get_submodule(path)
    assert isinstance(conv, nn.Conv2d)
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.out_channels < 2:
        raise UserError(f"`whiten` needs a plain first convolution with at least 2 filters; {path} is grouped, "
                        "dilated or has a single filter")
    return conv


@torch.no_grad()
def whiten_first_conv(model: nn.Module, images: torch.Tensor, eps: float = WHITEN_EPS) -> nn.Conv2d:
    """Set the first convolution of ``model`` to whiten the patches of the network inputs ``images``
    (normalised floats) and fix its filters; returns the convolution.

    Its filters are the whitening filters of the largest ``out_channels // 2`` eigenvalues and their
    negatives (airbench's 2·3·2·2 = 24 filters hold all 12); any filters beyond keep their initialisation.
    """
    conv = first_conv(model)
    weight = conv.weight
    if images.shape[1] != weight.shape[1]:
        raise UserError(f"`whiten`: the images have {images.shape[1]} channels, the first convolution reads "
                        f"{weight.shape[1]}")
    if not len(images):
        raise UserError("`whiten` needs training images to whiten")
    filters, _ = whitening_filters(patch_moment(images.float().cpu(), tuple(weight.shape[2:])), eps)
    pairs = min(len(filters), weight.shape[0] // 2)
    chosen = filters[:pairs].view(pairs, *weight.shape[1:]).to(weight.dtype)
    weight[:2 * pairs] = torch.cat([chosen, -chosen]).to(weight.device)
    if conv.bias is not None:
        conv.bias.zero_()
    weight.requires_grad_(False)
    return conv


@torch.no_grad()
def dirac_init(model: nn.Module) -> int:
    """Make every convolution after the first the identity on its first input channels; returns how many."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1:]
    for conv in convs:
        if conv.groups == 1:
            nn.init.dirac_(conv.weight[:conv.in_channels])
    return sum(conv.groups == 1 for conv in convs)
