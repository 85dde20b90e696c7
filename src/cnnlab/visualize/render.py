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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

__all__ = ["Panel", "colorize", "grid_figure", "image", "minmax", "mosaic", "panels_figure", "png", "rgb", "text_size",
           "wrap"]

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


def text_size(text: str, fontsize: float) -> tuple[float, float]:
    """Width and height in inches of ``text`` (lines and all) as matplotlib draws it at ``fontsize``
    points, under the current rc settings."""
    fig = Figure(dpi=72)
    artist = fig.text(0, 0, text, fontsize=fontsize)
    box = artist.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    return box.width / 72, box.height / 72


def wrap(text: str, fontsize: float, width: float) -> str:
    """``text`` with each line broken between words (inside a word if it must) to fit ``width`` inches."""
    lines = []
    for line in text.split("\n"):
        current = ""
        for word in line.split(" "):
            trial = f"{current} {word}" if current else word
            if not current or text_size(trial, fontsize)[0] <= width:
                current = trial
                continue
            lines.append(current)
            current = word
        while len(current) > 1 and text_size(current, fontsize)[0] > width:  # one word wider than the width
            cut = len(current) - 1
            while cut > 1 and text_size(current[:cut], fontsize)[0] > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
        lines.append(current)
    return "\n".join(lines)


MARGIN = 0.08  # inches around every figure
TITLE_SIZE, CAPTION_SIZE, SIDE_SIZE = 10, 7, 9  # points
GAP = 0.06  # inches between a caption and what it captions


def grid_figure(tiles: np.ndarray, title: str, *, labels: Sequence[str] | None = None,
                cmap: str | None = None, vmin: float | None = None, vmax: float | None = None,
                side: np.ndarray | None = None, side_title: str = "", cols: int | None = None,
                colorbar: str | None = None) -> Figure:
    """Tiles as one labelled grid, with an optional image (``side``) to its left.

    Gray tiles (N, h, w) go through ``cmap`` with one shared range (``vmin``/``vmax``, default the
    tiles' own), so their brightness is comparable; RGB tiles (N, h, w, 3) are drawn as they are.
    The figure is laid out in inches from the measured size of every caption, so that no text
    overlaps a picture or another text, or leaves the figure.
    """
    n, h, w = tiles.shape[:3]
    pad = max(1, h // 16)
    grid, cols = mosaic(tiles, cols, pad=pad, fill=np.nan if tiles.ndim == 3 else 1.0)
    grid_w = min(16.0, max(4.0, 0.45 * cols * max(1.0, w / 16)))
    grid_h = grid_w * grid.shape[0] / grid.shape[1]
    side_w = grid_w * 0.45 if side is not None else 0.0
    side_gap = 0.15 if side is not None else 0.0
    bar_w = 0.95 if colorbar and tiles.ndim == 3 else 0.0  # the bar, its tick labels and its label
    width = MARGIN + side_w + side_gap + grid_w + bar_w + MARGIN
    title = wrap(title, TITLE_SIZE, grid_w + bar_w)
    title_h = text_size(title, TITLE_SIZE)[1] + GAP
    height = MARGIN + max(title_h + grid_h, 0) + MARGIN
    if side is not None:
        side_title = wrap(side_title, SIDE_SIZE, side_w)
        side_h = side_w * side.shape[0] / side.shape[1]
        height = max(height, MARGIN + text_size(side_title, SIDE_SIZE)[1] + GAP + side_h + MARGIN)
    fig = Figure(figsize=(width, height), dpi=DPI)

    def box(left: float, top: float, w_in: float, h_in: float) -> tuple[float, float, float, float]:
        """An axes rectangle in figure fractions from inches measured from the top-left corner."""
        return left / width, 1 - (top + h_in) / height, w_in / width, h_in / height

    if side is not None:
        ax_side = fig.add_axes(box(MARGIN, height - MARGIN - side_h, side_w, side_h))
        ax_side.imshow(side, interpolation="nearest")
        ax_side.set_title(side_title, fontsize=SIDE_SIZE, pad=GAP * 72)
        ax_side.axis("off")
    left = MARGIN + side_w + side_gap
    ax = fig.add_axes(box(left, height - MARGIN - grid_h, grid_w, grid_h))
    if tiles.ndim == 3:
        cm = matplotlib.colormaps[cmap or ACTIVATION].with_extremes(bad="white")
        im = ax.imshow(grid, cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
        if colorbar:
            cax = fig.add_axes(box(left + grid_w + 0.1, height - MARGIN - grid_h + 0.1, 0.15, grid_h - 0.2))
            fig.colorbar(im, cax=cax, label=colorbar)
    else:
        ax.imshow(grid, interpolation="nearest")
    fig.text((left + (grid_w + bar_w) / 2) / width, 1 - MARGIN / height, title, fontsize=TITLE_SIZE,
             ha="center", va="top")
    ax.axis("off")
    if labels is not None:
        size = max(3.0, min(8.0, 72 * grid_w / cols / 4.5))
        for i, label in enumerate(labels):
            r, c = divmod(i, cols)  # a tile's top-left pixel is at pad + index × (side + pad); its edge 0.5 before
            ax.text(pad + c * (w + pad) - 0.5 + 0.06 * w, pad + r * (h + pad) - 0.5 + 0.06 * h, label, fontsize=size,
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


PANEL, COLUMN = 1.7, 1.9  # inches: a picture's side, and the width of a column


def panels_figure(rows: Sequence[Sequence[Panel]], title: str = "") -> Figure:
    """A table of panels, one row per image and one column per method or layer.

    Laid out in inches: each row is as tall as its longest caption plus a picture, captions are
    wrapped to their column, and the title to the figure, so nothing overlaps however long a
    caption or a class name is.
    """
    nrows, ncols = len(rows), max(len(r) for r in rows)
    width = 2 * MARGIN + ncols * COLUMN
    captions = [[wrap(p.title, CAPTION_SIZE, COLUMN - 0.1) if p.title else "" for p in row] for row in rows]
    heads = [max((text_size(t, CAPTION_SIZE)[1] + GAP for t in row if t), default=0.0) for row in captions]
    title = wrap(title, TITLE_SIZE, width - 2 * MARGIN) if title else ""
    title_h = text_size(title, TITLE_SIZE)[1] + 2 * GAP if title else 0.0
    row_gap = 0.1
    height = 2 * MARGIN + title_h + sum(heads) + nrows * PANEL + (nrows - 1) * row_gap
    fig = Figure(figsize=(width, height), dpi=DPI)
    top = MARGIN + title_h
    for r, row in enumerate(rows):
        top += heads[r]
        for c, p in enumerate(row):
            left = MARGIN + c * COLUMN + (COLUMN - PANEL) / 2
            ax = fig.add_axes((left / width, 1 - (top + PANEL) / height, PANEL / width, PANEL / height))
            ax.axis("off")
            _draw(ax, p)
            if captions[r][c]:
                ax.set_title(captions[r][c], fontsize=CAPTION_SIZE, pad=GAP * 72)
        top += PANEL + row_gap
    if title:
        fig.text(0.5, 1 - MARGIN / height, title, fontsize=TITLE_SIZE, ha="center", va="top")
    return fig


def rgb(p: Panel) -> np.ndarray:
    """The panel's picture as RGB (H, W, 3) in [0, 1]: values through its colour map, over its image if any."""
    if p.picture.ndim == 3:
        return p.picture
    values = p.picture
    if p.symmetric:
        lim = float(np.abs(values).max()) or 1.0
        out = colorize(values, p.cmap or SIGNED, -lim, lim)
    else:
        out = colorize(values, p.cmap or HEAT)
    return 0.5 * p.under + 0.5 * out if p.under is not None else out


def _draw(ax, p: Panel) -> None:
    ax.imshow(rgb(p), interpolation="bilinear" if p.picture.ndim == 2 and p.under is not None else "nearest")
    if p.box is not None:
        top, left, bottom, right = p.box
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                   ec="#00e5ff", lw=1.2))


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes, at the resolution of every visualisation."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
