"""Figures for the visualisations: tile grids, tables of panels with heat-map overlays, colour maps, PNG.

Grids are composed as one pixel array and drawn with a single ``imshow``, so showing all 512
channels of conv5_x costs one image, not 512 axes. Colour maps are perceptually uniform
(viridis for activations, inferno for heat maps) or diverging and centred on zero (RdBu_r for
signed attributions), as a paper figure wants. Figures are plain ``matplotlib.figure.Figure``
objects, not pyplot's: no global state, nothing to close, no backend to choose.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

__all__ = ["Panel", "colorize", "grid_figure", "image", "minmax", "mosaic", "panels_figure", "png"]

HEAT = "inferno"
ACTIVATION = "viridis"
SIGNED = "RdBu_r"
DPI = 150


def minmax(t: Tensor, dims: Sequence[int] | None = None) -> Tensor:
    """Scale to [0, 1] over ``dims`` (default: all but the first); a constant tile becomes 0."""
    dims = tuple(range(1, t.ndim)) if dims is None else tuple(dims)
    lo = t.amin(dim=dims, keepdim=True)
    hi = t.amax(dim=dims, keepdim=True)
    return (t - lo) / (hi - lo).clamp_min(1e-12)


def colorize(values: np.ndarray, cmap: str, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Values (H, W) → RGB (H, W, 3) in [0, 1] through a matplotlib colour map."""
    lo = float(np.min(values)) if vmin is None else vmin
    hi = float(np.max(values)) if vmax is None else vmax
    scaled = (values - lo) / max(hi - lo, 1e-12)
    return matplotlib.colormaps[cmap](np.clip(scaled, 0, 1))[..., :3]


def image(t: Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] → (H, W, 3) for matplotlib; one channel is shown as gray."""
    a = t.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def mosaic(tiles: np.ndarray, cols: int | None = None, pad: int = 1, fill: float = 1.0) -> tuple[np.ndarray, int]:
    """Tiles (N, h, w[, 3]) → one array with ``pad`` pixels of ``fill`` between tiles, and its column count."""
    n, h, w = tiles.shape[:3]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    shape = (rows * (h + pad) + pad, cols * (w + pad) + pad) + tiles.shape[3:]
    out = np.full(shape, fill, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tiles[i]
    return out, cols


def grid_figure(tiles: np.ndarray, title: str, *, labels: Sequence[str] | None = None,
              cmap: str | None = None, vmin: float | None = None, vmax: float | None = None,
              side: np.ndarray | None = None, side_title: str = "", cols: int | None = None,
              colorbar: str | None = None) -> Figure:
    """Tiles as one labelled grid, with an optional image (``side``) to its left.

    Gray tiles (N, h, w) go through ``cmap`` with one shared range (``vmin``/``vmax``, default the
    tiles' own), so their brightness is comparable; RGB tiles (N, h, w, 3) are drawn as they are.
    """
    n, h, w = tiles.shape[:3]
    grid, cols = mosaic(tiles, cols, pad=max(1, h // 16), fill=np.nan if tiles.ndim == 3 else 1.0)
    rows = math.ceil(n / cols)
    inches = min(16.0, max(4.0, 0.45 * cols * max(1.0, w / 16)))
    side_inches = inches * 0.45 if side is not None else 0
    fig = Figure(figsize=(inches + side_inches + (0.8 if colorbar else 0), inches * rows / cols + 0.7), dpi=DPI)
    if side is not None:
        frac = side_inches / (inches + side_inches)
        ax_side = fig.add_axes((0.01, 0.1, frac - 0.02, 0.8))
        ax_side.imshow(side, interpolation="nearest")
        ax_side.set_title(side_title, fontsize=9)
        ax_side.axis("off")
        ax = fig.add_axes((frac, 0.02, (1 - frac) * (0.9 if colorbar else 0.98), 0.9))
    else:
        ax = fig.add_axes((0.01, 0.02, 0.9 if colorbar else 0.98, 0.9))
    if tiles.ndim == 3:
        cm = matplotlib.colormaps[cmap or ACTIVATION].with_extremes(bad="white")
        im = ax.imshow(grid, cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
        if colorbar:
            fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label=colorbar)
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    if labels is not None:
        step = grid.shape[1] / cols
        size = max(3.0, min(8.0, 72 * inches / cols / 4.5))
        for i, label in enumerate(labels):
            r, c = divmod(i, cols)
            ax.text(c * step + step * 0.06, r * (grid.shape[0] / rows) + step * 0.06, label, fontsize=size,
                    color="white", va="top", ha="left",
                    bbox=dict(boxstyle="square,pad=0.05", fc="black", ec="none", alpha=0.55))
    return fig


@dataclass
class Panel:
    """One cell of a figure: an RGB image, or values drawn through ``cmap`` over an optional image."""

    picture: np.ndarray  # (H, W, 3) RGB in [0, 1], or (H, W) values
    title: str = ""
    cmap: str | None = None  # for values
    under: np.ndarray | None = None  # an RGB image to overlay the values on
    symmetric: bool = False  # centre the colour map on zero (signed attributions)
    box: tuple[int, int, int, int] | None = None  # (top, left, bottom, right) to outline


def panels_figure(rows: Sequence[Sequence[Panel]], title: str = "") -> Figure:
    """A table of panels, one row per image and one column per method or layer."""
    nrows, ncols = len(rows), max(len(r) for r in rows)
    fig = Figure(figsize=(1.9 * ncols + 0.3, 2.15 * nrows + (0.5 if title else 0.1)), dpi=DPI)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(row):
                continue
            p = row[c]
            _draw(ax, p)
            if p.title:
                ax.set_title(p.title, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(pad=0.3, h_pad=1.2)
    return fig


def _draw(ax, p: Panel) -> None:
    if p.picture.ndim == 3:
        ax.imshow(p.picture, interpolation="nearest")
    else:
        values = p.picture
        if p.symmetric:
            lim = float(np.abs(values).max()) or 1.0
            rgb = colorize(values, p.cmap or SIGNED, -lim, lim)
        else:
            rgb = colorize(values, p.cmap or HEAT)
        if p.under is not None:
            rgb = 0.5 * p.under + 0.5 * rgb
        ax.imshow(rgb, interpolation="bilinear" if p.under is not None else "nearest")
    if p.box is not None:
        top, left, bottom, right = p.box
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                   ec="#00e5ff", lw=1.2))


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes, at the resolution of every visualisation."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
