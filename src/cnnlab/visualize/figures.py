"""One drawing function per result of :mod:`cnnlab.inspect.results`: matplotlib figures by file stem.

The inspector has chosen the images, layers, targets and captions; these only lay the results out
(:mod:`cnnlab.visualize.render`). ``cnnlab visualize`` writes the figures as PNGs; the report inlines them.
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.offsetbox import AnnotationBbox, OffsetImage

from cnnlab.core.errors import one_line
from cnnlab.inspect.registry import EXPLAINERS
from cnnlab.inspect.results import (
    Dreams,
    Embedding,
    Excitations,
    Explanations,
    FeatureMaps,
    Filters,
    Inversions,
    Maximisation,
    Projections,
    Sanity,
)
from cnnlab.visualize.render import ACTIVATION, DPI, HEAT, SIGNED, Panel, grid_figure, image, minmax, panels_figure

__all__ = ["DRAW", "class_colours", "draw", "sanity_figure"]

LEGEND_CLASSES = 20  # the most classes the embedding's legend names (and tab20 tells apart)

Figures = dict[str, Figure]  # file stem → figure


def _stem(layer: str) -> str:
    return layer.replace(".", "-")


def _pictures(pixels) -> list[np.ndarray]:
    return [image(p) for p in pixels]


def _wrapped(panels: list[Panel], per_row: int = 8) -> list[list[Panel]]:
    return [panels[i:i + per_row] for i in range(0, len(panels), per_row)]


def filters(result: Filters) -> Figures:
    """Every filter of the layer in one grid, and the filters chosen enlarged, weight by weight."""
    layer, path, weight = result.layer, result.path, result.weight
    out_c, in_c, kh, kw = weight.shape
    tiles = minmax(weight)
    name = _stem(layer)
    figures = {}
    if in_c in (1, 3):
        pictures = tiles.permute(0, 2, 3, 1).numpy() if in_c == 3 else tiles[:, 0].numpy()
        figures[name] = grid_figure(pictures, f"{layer} ({path}): all {out_c} filters, {kh}×{kw}, each min–max "
                                    "scaled", labels=[str(i) for i in range(out_c)], cmap="gray", vmin=0, vmax=1)
    else:
        nf, nc = result.rows, min(in_c, 32)
        pictures = tiles[:nf, :nc].reshape(nf * nc, kh, kw).numpy()
        figures[name] = grid_figure(pictures, f"{layer} ({path}): filters 0–{nf - 1} (rows) × input channels "
                                    f"0–{nc - 1} (columns) of {out_c}×{in_c}, {kh}×{kw}, each filter min–max "
                                    "scaled", cmap="gray", vmin=0, vmax=1, cols=nc)
    names = ["R", "G", "B"] if in_c == 3 else [f"in {c}" for c in range(in_c)]
    for which in result.channels:
        w = weight[which]
        panels = [Panel(tiles[which].permute(1, 2, 0).numpy(), f"filter {which}, RGB")] if in_c == 3 else []
        lim = float(w.abs().max())
        for c in range(min(in_c, 8)):
            panels.append(Panel(w[c].numpy(), f"{names[c]} weights (±{lim:.2g})", cmap=SIGNED, symmetric=True))
        figures[f"{name}_filter{which}"] = panels_figure([panels], title=f"{layer} filter {which} enlarged")
    return figures


def features(result: FeatureMaps) -> Figures:
    """All channels of the layer for each image, on one colour scale, beside the image."""
    images, layer = result.images, result.layer
    size = images.pixels.shape[-1]
    pixels = _pictures(images.pixels)
    c, h, w = result.maps.shape[1:]
    figures = {}
    for i, name in enumerate(images.names):
        a = result.maps[i]
        figures[f"{_stem(layer)}_{name}"] = grid_figure(
            a.numpy(), f"{layer}: all {c} channels at {h}×{w} (one colour scale)",
            labels=[str(k) for k in range(c)], cmap=ACTIVATION, vmin=float(a.min()), vmax=float(a.max()),
            side=pixels[i], side_title=f"input as the network\nsaw it, {size}×{size}\n{images.captions[i]}",
            colorbar="activation")
    return figures


def map_panel(kind: str, a, signed: bool, under: np.ndarray | None = None) -> Panel:
    """One map as a picture: a CAM over the image; a signed attribution summed over colours on a diverging
    scale; guided gradients as colour; other magnitudes at their largest over colours (Simonyan et al.)."""
    if a.shape[0] == 1:
        return Panel(a[0].numpy(), kind, HEAT, under=under)
    if signed:
        return Panel(a.sum(0).numpy(), kind, SIGNED, symmetric=True)
    if kind.startswith("guided"):  # guided gradients keep their colours, as Springenberg et al. show them
        return Panel(image(minmax(a[None])[0]), kind)
    return Panel(a.abs().amax(0).numpy(), kind, HEAT)


def explanations(result: Explanations) -> Figures:
    """A row per (image, target): the image with its caption, then one column per method."""
    pixels = _pictures(result.images.pixels)
    kinds = list(result.maps)
    table = [[Panel(pixels[i], result.captions[r])]
             + [map_panel(k, result.maps[k][r], result.signed[k], pixels[i]) for k in kinds]
             for r, i in enumerate(result.rows)]
    if all(EXPLAINERS[k].cam for k in kinds):
        return {f"{_stem(result.layer)}_{result.images.tag}": panels_figure(
            table, title=f"class activation maps at {result.layer}")}
    return {result.images.tag: panels_figure(table, title="pixel attributions")}


def excitations(result: Excitations) -> Figures:
    pixels = _pictures(result.pixels)
    first = [Panel(p, f"#{int(i)}  max {float(s):.2f}", box=b)
             for p, i, s, b in zip(pixels, result.indices, result.scores, result.boxes)]
    second = [Panel(result.heat[k].numpy(), "", HEAT, under=pixels[k]) for k in range(len(pixels))]
    return {f"{_stem(result.layer)}_ch{result.channel}": panels_figure(
        [first, second], title=f"{result.layer} channel {result.channel}: the test images that excite it most "
                               "(box: effective receptive field of the strongest unit)")}


def projections(result: Projections) -> Figures:
    images = result.images
    pixels = _pictures(images.pixels)
    table = [[Panel(pixels[i], images.captions[i])] +
             [Panel(image(minmax(p[i][None])[0]), f"ch {c} (max {float(result.strongest[i, c]):.2f})")
              for c, p in result.projections.items()] for i in range(len(images.names))]
    return {f"{_stem(result.layer)}_{images.tag}": panels_figure(
        table, title=f"{result.layer}: strongest activation of each channel projected to pixels (deconvnet)")}


def inversions(result: Inversions) -> Figures:
    images = result.images
    pixels = _pictures(images.pixels)
    columns = {layer: _pictures(p) for layer, p in result.pixels.items()}
    table = [[Panel(pixels[i], f"{name} (original)")] +
             [Panel(columns[layer][i], f"from {layer}\nrel. dist {result.distances[layer][i]:.2f}")
              for layer in result.pixels] for i, name in enumerate(images.names)]
    return {images.tag: panels_figure(table, title="inverted representations (Mahendran & Vedaldi 2015)")}


def maximisation(result: Maximisation) -> Figures:
    panels = [Panel(p, label) for p, label in zip(_pictures(result.pixels), result.labels)]
    if result.layer is None:
        return {"classes": panels_figure(_wrapped(panels),
                                         title="class models: images the network takes for each class")}
    units = result.units
    return {f"{_stem(result.layer)}_ch{units[0]}-{units[-1]}": panels_figure(
        _wrapped(panels), title=f"{result.layer}: images that maximise each channel's mean activation (start → end)")}


def dreams(result: Dreams) -> Figures:
    images = result.images
    table = [[Panel(a, name), Panel(b, f"dreamed at {result.layer}")]
             for name, a, b in zip(images.names, _pictures(images.pixels), _pictures(result.pixels))]
    return {f"{_stem(result.layer)}_{images.tag}": panels_figure(table, title="DeepDream")}


def sanity_figure(result: Sanity, picture: np.ndarray, caption: str) -> Figure:
    """The cascading randomisation of one image: a row per method, the trained network's map and then
    the map after each cascade step, with the step's mean rank correlation over all the images."""
    rows = [[Panel(picture, caption)]]
    for name, maps in result.maps.items():
        if name not in result.methods:
            continue
        signed = EXPLAINERS[name].signed if name in EXPLAINERS else False
        cells = [Panel(maps[0].numpy(), f"{name}\ntrained network", SIGNED if signed else HEAT, symmetric=signed)]
        for layer, m in zip(result.layers, maps[1:]):
            rho = result.methods[name].rho(layer)
            cells.append(Panel(m.numpy(), f"down to {layer} re-init.\nmean ρ {rho:.2f}", SIGNED if signed else HEAT,
                               symmetric=signed))
        rows.append(cells)
    return panels_figure(rows, title="cascading randomisation: each map after re-initialising the layers from fc "
                                     "down to the one named (Adebayo et al. 2018)")


def class_colours(k: int) -> np.ndarray:
    """One RGB colour (k, 3) per class: tab10 or tab20 up to 20 classes, else evenly around the hue circle."""
    if k <= 20:
        return np.asarray(matplotlib.colormaps["tab10" if k <= 10 else "tab20"].colors)[:k]
    return matplotlib.colormaps["hsv"](np.linspace(0, 1, k, endpoint=False))[:, :3]


def embedding(result: Embedding) -> Figures:
    """The map: a point per test image coloured by its true class, a legend, and thumbnails of a spread of
    the points drawn where they lie."""
    k = len(result.classes)
    colours = class_colours(k)
    fig = Figure(figsize=(10, 8.4), dpi=DPI)
    ax = fig.add_axes((0.02, 0.02, 0.72 if k <= LEGEND_CLASSES else 0.96, 0.9))
    xy = result.points.numpy()
    ax.scatter(xy[:, 0], xy[:, 1], s=6, c=colours[result.labels.numpy()], linewidths=0, alpha=0.8)
    side = result.pixels.shape[-1]
    for row, pixels in zip(result.shown, result.pixels):
        edge = colours[int(result.labels[row])]
        box = AnnotationBbox(OffsetImage(image(pixels), zoom=24 / side), tuple(xy[row]), frameon=True,
                             pad=0.08, bboxprops=dict(edgecolor=edge, linewidth=1.5))
        ax.add_artist(box)
    ax.set_xticks([])
    ax.set_yticks([])
    if k <= LEGEND_CLASSES:
        handles = [Line2D([], [], marker="o", linestyle="", color=colours[c],
                                           label=one_line(name)) for c, name in enumerate(result.classes)]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.75, 0.5), frameon=False, title="true class")
    fig.suptitle(f"{len(xy)} test images by the input of {result.layer} ({result.features.shape[1]} features), "
                 f"{result.method}, seed {result.seed}", fontsize=9)
    return {"embedding": fig}


DRAW: dict[type, Callable] = {Filters: filters, FeatureMaps: features, Explanations: explanations,
                              Excitations: excitations, Projections: projections, Inversions: inversions,
                              Maximisation: maximisation, Dreams: dreams, Embedding: embedding}


def draw(result) -> Figures:
    """The figures of any result of :mod:`cnnlab.inspect.results` but the sanity table."""
    return DRAW[type(result)](result)
