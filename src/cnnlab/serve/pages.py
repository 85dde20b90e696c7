"""The explorer's page, rendered on the server: the panels' frames, with every name escaped.

The page holds no script and no style of its own (the Content-Security-Policy forbids both inline);
``static/app.js`` (and ``static/labels.js``, the bad labels) fills the panels from the JSON endpoints,
writing names with ``textContent`` only. Class names, run names and layer names come from files the user
did not necessarily write, so each goes through :func:`html.escape`, attributes included.
"""

from __future__ import annotations

from cnnlab.core.metrics import tta_name
from cnnlab.report.page import document_head, e
from cnnlab.serve.runs import LAYERED, METHODS, Served
from cnnlab.viz.cam import CAMS

__all__ = ["page"]


def _options(pairs: list[tuple[str, str]], selected: str | None = None) -> str:
    return "".join(f'<option value="{e(v)}"{" selected" if v == selected else ""}>{e(text)}</option>'
                   for v, text in pairs)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)


def _architecture(s: Served) -> str:
    rows = []
    for stage in s.summary["stages"]:
        size = stage["output_size"]
        maps = len(size) == 3
        text = "×".join(str(v) for v in size) if size else "–"
        attrs = f' data-layer="{e(stage["name"])}" class="clickable" tabindex="0"' if maps else ""
        rows.append(f'<tr{attrs}><th scope="row">{e(stage["name"])}</th><td>{e(text)}</td>'
                    f'<td class="layers">{e(stage["layers"])}</td><td>{_count(stage["params"])}</td></tr>')
    return ('<table id="arch"><caption>Architecture (Table 1 style): a row with feature maps shows them for '
            'the current image</caption><thead><tr><th>layer</th><th>output size</th><th>layers</th>'
            '<th>params</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def page(runs: list[Served], index: int) -> str:
    """The page of run ``index``: its panels, whose contents the scripts fill in from the API."""
    s = runs[index]
    tta = "1" if s.loaded.tta else "0"
    head = document_head(f"cnnlab serve: {s.name}",
                         '<link rel="stylesheet" href="/static/app.css">\n<script src="/static/app.js" defer></script>'
                         '\n<script src="/static/labels.js" defer></script>')
    return head + f"""<body data-run="{index}" data-tta="{tta}" data-layered="{e(' '.join(sorted(LAYERED)))}">
{_header(runs, index)}
<main>
{_image_in(s)}
{_why(s)}
{_inside(s)}
{RUN_PANEL}
{MAP_PANEL}
{_mistakes(s)}
{BAD_LABELS_PANEL}
</main>
</body>
</html>
"""


def _header(runs: list[Served], index: int) -> str:
    current = ' aria-current="page"'
    nav = "".join(f'<a href="/run/{r.index}"{current if r.index == index else ""}>{e(r.name)}</a>' for r in runs)
    others = [(str(r.index), r.name) for r in runs if r.index != index]
    compare = (f'<label>side by side with <select id="compare"><option value="">—</option>{_options(others)}'
               "</select></label>") if others else ""
    return f"""<header>
<h1>cnnlab <span class="run-name">{e(runs[index].name)}</span></h1>
<nav aria-label="runs">{nav}</nav>
{compare}
</header>"""


def _image_in(s: Served) -> str:
    browse = _options([("", "choose a list…"), ("wrong", "misclassified"),
                       ("confident-wrong", "most confident wrong")])
    browse += ('<optgroup label="by class">' + _options([(f"class:{i}", c) for i, c in enumerate(s.classes)])
               + "</optgroup>")
    return f"""<section id="image-in">
<h2>Image in</h2>
<div id="drop" class="drop" tabindex="0">
<p>Drop an image here, or <label class="button">choose a file<input type="file" id="file" accept="image/*"></label></p>
<label>or a test image: <select id="browse">{browse}</select></label>
<progress id="browse-progress" hidden></progress>
</div>
<p id="message" class="message" role="alert" hidden></p>
<div id="thumbs" class="thumbs"></div>
<div class="current">
<div class="column" id="this-run">
<figure><img id="input" alt="the network's input" hidden>\
<figcaption id="input-caption">no image yet</figcaption></figure>
<label><input type="checkbox" id="tta"{" checked" if s.loaded.tta else ""}> \
{tta_name(s.loaded.tta or True).removesuffix(" TTA")} test-time augmentation (TTA)</label>
<table id="top5" class="top"><caption>top-5 (click a row to explain that class)</caption>
<thead><tr><th>class</th><th>probability</th></tr></thead><tbody></tbody></table>
</div>
<div class="column" id="other-run" hidden>
<h3 id="other-name"></h3>
<figure><img id="other-input" alt="the other run's input"><figcaption id="other-caption"></figcaption></figure>
<table id="other-top5" class="top"><thead><tr><th>class</th><th>probability</th></tr></thead><tbody></tbody></table>
<figure><img id="other-explanation" alt="the other run's explanation">\
<figcaption id="other-explanation-caption"></figcaption></figure>
</div>
</div>
</section>"""


def _why(s: Served) -> str:
    cams = [(m, m) for m in METHODS if m in CAMS]
    attributions = [(m, m) for m in METHODS if m not in CAMS]
    methods = (f'<optgroup label="class activation maps">{_options(cams, "grad-cam")}</optgroup>'
               f'<optgroup label="attributions">{_options(attributions)}</optgroup>')
    layers = _options([(name, name) for name in s.layers], s.default_layer)
    targets = _options([("", "the predicted class")] + [(str(i), c) for i, c in enumerate(s.classes)])
    return f"""<section id="why">
<h2>Why</h2>
<div class="controls">
<label>method <select id="method">{methods}</select></label>
<label>class <select id="target">{targets}</select></label>
<label>layer <select id="layer">{layers}</select></label>
</div>
<figure><img id="explanation" alt="the explanation" hidden>\
<figcaption id="explanation-caption">upload or pick an image</figcaption></figure>
<table id="trust"><caption>How far to trust each method <span id="trust-source"></span>
<progress id="trust-progress" max="1" hidden></progress></caption>
<thead><tr><th>method</th><th>verdict</th><th>rand. ρ ↓</th><th>insertion AUC ↑</th><th>ROAD ↑</th></tr></thead>
<tbody></tbody></table>
</section>"""


def _inside(s: Served) -> str:
    return f"""<section id="inside">
<h2>Inside</h2>
{_architecture(s)}
{_unit_links(s)}
<h3 id="maps-title">Feature maps: click a layer</h3>
<div id="maps" class="tiles"></div>
<div id="channel" hidden>
<h3 id="channel-title"></h3>
<div class="channel-parts">
<div><h4>Top test images</h4><progress id="top-progress" max="1" hidden></progress>\
<div id="top-images" class="thumbs"></div></div>
<div><h4>Activation maximisation</h4><progress id="max-progress" max="1" hidden></progress>\
<img id="maximized" alt="the image that excites this channel most" hidden></div>
<div><h4>Filter weights</h4><p id="filters-caption"></p><div id="filters" class="tiles small"></div></div>
</div>
</div>
</section>"""


def _unit_links(s: Served) -> str:
    """Links to the unit pages of each layer with feature maps (see :mod:`cnnlab.serve.units`)."""
    links = " · ".join(f'<a href="/run/{s.index}/units/{e(layer)}">{e(layer)}</a>' for layer in s.layers)
    return f'<p id="unit-links">Unit pages (a page per channel: top images, maximisation, selectivity): {links}</p>'


# The same for every run: the script fills it in.
RUN_PANEL = """<section id="run">
<h2>Run</h2>
<div id="curves"></div>
<h3>Confusion matrix of the test set <progress id="confusion-progress" max="1" hidden></progress></h3>
<p id="confusion-caption"></p>
<table id="confusion"></table>
<div id="cell-images" class="thumbs"></div>
</section>"""


# The same for every run: the script draws the map.
MAP_PANEL = """<section id="map">
<h2>The test set through the network's eyes <progress id="map-progress" max="1" hidden></progress></h2>
<p id="map-caption">Each test image placed by its penultimate features (t-SNE), coloured by its true class. Point at
one to see it; click it to look at it in the other panels.</p>
<div id="map-box" class="map-box"><svg id="map-svg" role="img" aria-label="the test set on a map"></svg>
<div id="map-tip" class="map-tip" hidden><img id="map-tip-image" alt=""><p id="map-tip-text"></p></div></div>
<ul id="map-legend" class="legend"></ul>
</section>"""


def _mistakes(s: Served) -> str:
    classes = _options([(str(i), c) for i, c in enumerate(s.classes)])
    return f"""<section id="mistakes">
<h2>Mistakes <progress id="mistakes-progress" max="1" hidden></progress></h2>
<p id="mistakes-caption"></p>
<h3>Most-confused pairs (true → predicted)</h3>
<div id="pairs"></div>
<h3>Top losses</h3>
<div id="losses" class="thumbs"></div>
<h3>Most and least typical images of <select id="typical-class">{classes}</select></h3>
<p class="hint">by the direction of their penultimate features, nearest to the class's mean direction first, and
farthest first</p>
<div id="typical-most" class="thumbs"></div>
<div id="typical-least" class="thumbs"></div>
</section>"""


# The training images whose label is likely wrong; static/labels.js fills it in.
BAD_LABELS_PANEL = """<section id="labels">
<h2>Bad labels <progress id="labels-progress" max="1" hidden></progress></h2>
<p id="labels-caption"></p>
<div id="bad-labels" class="thumbs"></div>
</section>"""
