"""Unit pages (a dossier per channel of a layer): ``cnnlab visualize dossier`` and the explorer's unit pages.

:func:`contents` turns the inspector's :class:`~cnnlab.inspect.results.Units` into one JSON document, its
pictures as PNG ``data:`` URIs (the top test images with the strongest unit's receptive field drawn in,
the maximised variants, the filter); the explorer caches exactly that. :func:`index_page` and
:func:`unit_page` render it, for a folder on disk and for the explorer alike: only where the pages link
to and how they get their style and script differ (:class:`Assets`). :func:`dossier` is the command.

The index sorts its grid with a few lines of script (``static/units.js``); a page read from disk carries it
inline, allowed by its hash in the page's Content-Security-Policy, and the explorer serves it as a file.
Every name (classes, layers, the run) goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write
from cnnlab.inspect import Inspection
from cnnlab.inspect.results import Units
from cnnlab.report.charts import png_uri
from cnnlab.report.page import CSS, document_end, document_head, e

__all__ = ["Assets", "UNITS_CSS", "UNITS_JS", "contents", "dossier", "index_page", "page_name", "unit_page",
           "write_pages"]

UNITS_CSS = resources.files("cnnlab.report").joinpath("static", "units.css").read_text()
UNITS_JS = resources.files("cnnlab.report").joinpath("static", "units.js").read_text()
BOX = (255, 214, 0)  # the receptive field's outline on the top images
THUMB = 96  # pixels a side of a boxed top image (small images are enlarged pixel for pixel to about this)


@dataclass(frozen=True)
class Assets:
    """How a unit page gets its style and script, and where it links: ``unit(channel)`` the href of a unit's
    page, ``index`` that of the layer's index."""

    head: str  # inside <head>: the style, or the tags that fetch it
    tail: str  # before </body>: the script, or the tag that fetches it
    csp: str | None  # the Content-Security-Policy of a page read from disk (None: the server sends one)
    unit: Callable[[int], str]
    index: str


def page_name(channel: int) -> str:
    """A unit page's stable file name in a dossier folder."""
    return f"unit-{channel:04d}.html"


def folder_assets() -> Assets:
    """A dossier folder: style and script inline, the script allowed by its hash, links between the files."""
    digest = base64.b64encode(hashlib.sha256(UNITS_JS.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; "
           "base-uri 'none'; form-action 'none'")
    return Assets(f"<style>{CSS}{UNITS_CSS}</style>", f"<script>{UNITS_JS}</script>", csp, page_name, "index.html")


# --- the pictures -------------------------------------------------------------------------------------------


PICTURE = 128  # pixels a side at most of a maximised image (a 224 px one is shrunk: 512 units' pages stay small)


def _png(a: np.ndarray, most: int | None = None) -> str:
    img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
    if most is not None and max(img.size) > most:
        img.thumbnail((most, most))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return png_uri(buffer.getvalue())


def boxed(pixels: Tensor, box: tuple[int, int, int, int]) -> str:
    """A uint8 image (C, H, W) with ``box`` (top, left, bottom, right) outlined, enlarged pixel for pixel to
    about :data:`THUMB` pixels when it is smaller (or shrunk to it), as a PNG ``data:`` URI."""
    img = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy().squeeze(-1) if pixels.shape[0] == 1
                          else pixels.permute(1, 2, 0).cpu().numpy()).convert("RGB")
    scale = max(1, THUMB // max(img.size)) if max(img.size) < THUMB else THUMB / max(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)),
                     Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)
    top, left, bottom, right = (round(v * scale) for v in box)
    ImageDraw.Draw(img).rectangle([left, top, max(left, right - 1), max(top, bottom - 1)], outline=BOX, width=2)
    return _png(np.asarray(img))


def _picture(pixels: Tensor) -> str:
    """An image (C, H, W) in [0, 1] as a PNG ``data:`` URI, at its own size up to :data:`PICTURE` pixels."""
    return _png((pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy(), PICTURE)


def _filter_tiles(weight: Tensor, most: int = 64) -> list[str]:
    """One filter (in, kh, kw), min–max scaled over itself: one RGB tile when it reads an RGB image, else
    one gray tile per input channel (the first ``most``)."""
    w = (weight - weight.min()) / (weight.max() - weight.min()).clamp_min(1e-12)
    if w.shape[0] == 3:
        return [_picture(w)]
    return [_picture(c[None]) for c in w[:most]]


def _number(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else round(float(value), 6)


def contents(units: Units, images: Tensor, run: str) -> dict[str, Any]:
    """Everything the pages show, as one JSON document: ``images`` is the uint8 test set the top images index."""
    out = []
    for u, channel in enumerate(units.channels):
        top = [{"index": int(i), "score": _number(s), "label": int(y), "box": [int(v) for v in b],
                "picture": boxed(images[int(i)], tuple(int(v) for v in b))}
               for i, s, y, b in zip(units.top_indices[u], units.top_scores[u].tolist(), units.top_labels[u],
                                     units.boxes[u])]
        out.append({
            "channel": channel, "selectivity": _number(units.selectivity[u]), "preferred": int(units.preferred[u]),
            "class_means": [_number(v) for v in units.class_means[u].tolist()],
            "histogram": units.histogram[u].tolist(), "edges": [_number(v) for v in units.edges[u].tolist()],
            "best_mean": _number(units.best_mean[u]), "quality": _number(units.quality[u]),
            "reached": [_number(v) for v in units.reached[u].tolist()], "similarity": _number(units.similarity[u]),
            "variants": [_picture(v) for v in units.variants[u]], "top": top,
            "filter": None if units.filters is None else _filter_tiles(units.filters[u])})
    shape = None if units.filters is None else list(units.filters.shape[1:])
    return {"run": run, "layer": units.layer, "classes": units.classes, "count": units.count,
            "map_size": list(units.map_size), "steps": units.steps, "diversity": units.diversity,
            "filter_path": units.filter_path, "filter_shape": shape, "units": out}


# --- the pages ----------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _cell(data: dict[str, Any], u: dict[str, Any], assets: Assets) -> str:
    cls = data["classes"][u["preferred"]]
    top = u["top"][0]["picture"] if u["top"] else ""
    return (f'<a class="unit" href="{e(assets.unit(u["channel"]))}" data-channel="{u["channel"]}" '
            f'data-selectivity="{_fmt(u["selectivity"], 4)}" data-class="{u["preferred"]}" '
            f'data-quality="{_fmt(u["quality"] if u["quality"] is not None else -1.0, 4)}">'
            f'<span class="pair"><img src="{e(u["variants"][0])}" alt="channel {u["channel"]} maximised">'
            f'<img src="{e(top)}" alt="channel {u["channel"]}: its top test image"></span>'
            f'<b>unit {u["channel"]}</b><br>selectivity {_fmt(u["selectivity"])}<br>{e(cls)}</a>')


def index_page(data: dict[str, Any], assets: Assets) -> str:
    """The grid of every unit of the dossier, sortable by channel, selectivity, preferred class and quality."""
    cells = "".join(_cell(data, u, assets) for u in data["units"])
    sort = "".join(f'<option value="{v}">{t}</option>' for v, t in (
        ("channel", "channel"), ("selectivity", "class selectivity, highest first"),
        ("class", "preferred class, then selectivity"), ("quality", "maximisation quality, highest first")))
    title = f"{data['layer']} of {data['run']}: {len(data['units'])} of {data['count']} units"
    return document_head(f"cnnlab units: {title}", assets.head, assets.csp) + f"""<body>
<header><h1>Units of {e(title)}</h1>
<p class="sub">Each unit is a channel of {e(data['layer'])}: its maximised image (left) and its top test image with
the receptive field of its strongest unit (right), its class selectivity (Morcos et al. 2018) and the class its
test images excite most on average. Click one for its page.</p></header>
<main>
<p class="controls"><label>sort by <select id="sort">{sort}</select></label></p>
<div id="units" class="units">{cells}</div>
</main>
{assets.tail}
""" + document_end()


def _bars(values: list[float | None], labels: list[str], best: int) -> str:
    """Horizontal bars of the class means, as an inline SVG (no style attribute: the explorer forbids them)."""
    top = max([v for v in values if v is not None] + [1e-12])
    rows = []
    for k, (v, name) in enumerate(zip(values, labels)):
        width = 0 if v is None or v <= 0 else 240 * v / top
        colour = "#2f6fde" if k == best else "#9fb5dd"
        rows.append(f'<text x="0" y="{14 * k + 10}">{e(name[:18])}</text>'
                    f'<rect x="110" y="{14 * k + 2}" width="{width:.1f}" height="10" fill="{colour}"></rect>'
                    f'<text x="{114 + width:.1f}" y="{14 * k + 10}">{_fmt(v, 3)}</text>')
    return (f'<svg class="chart" id="class-means" width="420" height="{14 * len(values) + 4}" role="img" '
            f'aria-label="mean activation per class">{"".join(rows)}</svg>')


def _histogram(counts: list[int], edges: list[float | None]) -> str:
    most = max(counts + [1])
    bars = "".join(f'<rect x="{20 + 12 * k}" y="{110 - 100 * c / most:.1f}" width="11" height="{100 * c / most:.1f}" '
                   f'fill="#2f6fde"><title>{c} images</title></rect>' for k, c in enumerate(counts))
    right = 20 + 12 * len(counts)
    return (f'<svg class="chart" id="histogram" width="{right + 40}" height="130" role="img" '
            f'aria-label="histogram of the spatial-mean activation over the test images">{bars}'
            f'<text x="20" y="124">{_fmt(edges[0])}</text><text x="{right - 24}" y="124">{_fmt(edges[-1])}</text>'
            f'<text x="0" y="12">{most}</text></svg>')


def _top(data: dict[str, Any], u: dict[str, Any]) -> str:
    return "".join(
        f'<figure class="thumb"><img src="{e(t["picture"])}" alt="test image {t["index"]}"><figcaption>'
        f'#{t["index"]} {e(data["classes"][t["label"]])}<br>max {_fmt(t["score"])}</figcaption></figure>'
        for t in u["top"])


def _variants(u: dict[str, Any]) -> str:
    best = u["best_mean"]
    return "".join(
        f'<figure><img src="{e(src)}" alt="variant {k + 1}"><figcaption>mean {_fmt(r)}'
        f'{"" if best is None or r is None or best <= 0 else f" ({r / best:.2f}×)"}</figcaption></figure>'
        for k, (src, r) in enumerate(zip(u["variants"], u["reached"])))


def _filter(data: dict[str, Any], u: dict[str, Any]) -> str:
    if u["filter"] is None:
        return "<p>No convolution inside this layer makes its channels, so there is no filter to show.</p>"
    shape = "×".join(str(v) for v in data["filter_shape"])
    tiles = "".join(f'<img src="{e(src)}" alt="weights">' for src in u["filter"])
    per = "" if data["filter_shape"][0] == 3 else ", one tile per input channel, the first 64"
    return (f'<p>The weights of {e(data["filter_path"])} that make this channel ({e(shape)}: input channels × '
            f'kernel), min–max scaled over the filter{per}.</p><div class="grid" id="filter">{tiles}</div>')


def unit_page(data: dict[str, Any], position: int, assets: Assets) -> str:
    """The page of the ``position``-th unit of the dossier."""
    u = data["units"][position]
    c, classes = u["channel"], data["classes"]
    near = [data["units"][k]["channel"] for k in (position - 1, position + 1) if 0 <= k < len(data["units"])]
    links = " · ".join(f'<a href="{e(assets.unit(k))}">unit {k}</a>' for k in near)
    h, w = data["map_size"]
    quality = ("–" if u["quality"] is None else f"{u['quality']:.2f}")
    return document_head(f"cnnlab unit {c} of {data['layer']}", assets.head, assets.csp) + f"""<body>
<header><p class="crumbs"><a href="{e(assets.index)}">all units of {e(data['layer'])}</a> · {links}</p>
<h1>Unit {c} of {e(data['layer'])} <span class="sub">({e(data['run'])})</span></h1></header>
<main>
<section id="top"><h2>Top test images</h2>
<p>The test images on which the channel's strongest unit (of its {h}×{w} map) fires hardest, with that unit's receptive
field boxed: every pixel some path of the network connects to it.</p>
<div class="grid">{_top(data, u)}</div></section>
<section id="maximised"><h2>Activation maximisation</h2>
<p>{len(u['variants'])} images optimised together ({data['steps']} steps from noise, Fourier-parameterised with
jitter, as <code>cnnlab visualize maximize</code>) to excite the channel's mean activation, with lucid's diversity
term (weight {data['diversity']:g}) pushing them apart; their mean Gram-matrix cosine similarity is
{_fmt(u['similarity'])}. Quality: the activation they reach on average over the best test image's,
<strong id="quality">{quality}</strong> (the best test image reaches {_fmt(u['best_mean'])}).</p>
<div class="variants">{_variants(u)}</div></section>
<section id="selectivity"><h2>Class selectivity</h2>
<p>The channel's mean activation (its map's spatial mean, averaged over each class's test images). Class
selectivity index (Morcos et al. 2018: the highest class mean less the mean of the others, over their sum):
<strong id="selectivity-index">{_fmt(u['selectivity'], 3)}</strong>; it prefers
<strong id="preferred">{e(classes[u['preferred']])}</strong>.</p>
{_bars(u['class_means'], classes, u['preferred'])}</section>
<section id="distribution"><h2>Activation over the test set</h2>
<p>How many test images give each spatial-mean activation, from {_fmt(u['edges'][0])} to {_fmt(u['edges'][-1])}.</p>
{_histogram(u['histogram'], u['edges'])}</section>
<section id="filters"><h2>Filter</h2>{_filter(data, u)}</section>
</main>
{assets.tail}
""" + document_end()


def write_pages(data: dict[str, Any], out: Path) -> list[Path]:
    """The dossier as a folder: ``index.html`` and one ``unit-NNNN.html`` per unit; returns the files."""
    assets = folder_assets()
    pages = {out / "index.html": index_page(data, assets)}
    for k, u in enumerate(data["units"]):
        pages[out / page_name(u["channel"])] = unit_page(data, k, assets)
    try:
        return [atomic_write(path, text) for path, text in pages.items()]
    except OSError as err:
        raise UserError(f"cannot write `out` {out}: {err.strerror or err}; choose another folder") from None


def dossier(path: str | Path, layer: str | None = None, *, out: str | Path | None = None,
            units: tuple[int, ...] | list[int] = (), top_k: int = 9, variants: int = 4, steps: int = 64,
            device: str = "auto", data_dir: str | None = None,
            progress: Callable[[float], None] | None = None) -> list[Path]:
    """``cnnlab visualize dossier``: unit pages of ``units`` (default: all) of ``layer`` (default: the last
    spatial feature block) of the run folder or checkpoint ``path``, written to ``out`` (default
    ``RUN_DIR/viz/dossier/LAYER``); returns the files written, the index first."""
    inspection = Inspection.open(path, device=device, data_dir=data_dir)
    layer = inspection.layers([layer])[0] if layer else inspection.last_layer
    result = inspection.units(layer, list(units), top_k=top_k, variants=variants, steps=steps, progress=progress)
    images, _ = inspection.test_set()
    loaded = inspection.run
    name = (loaded.run_dir or loaded.path.parent).resolve().name
    folder = Path(out) if out else (loaded.run_dir or loaded.path.parent) / "viz" / "dossier" / layer
    return write_pages(contents(result, images, name), folder)
