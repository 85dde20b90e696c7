"""The report as one HTML page: inline CSS, images as ``data:`` URIs, no script, nothing fetched.

Every string that comes from the user or the data (class names are folder names; paths, dataset
specs, file names) goes through :func:`html.escape`, and the page's Content-Security-Policy allows
no script at all, so a class named ``<img src=x onerror=alert(1)>`` is shown as text.
"""

from __future__ import annotations

import html
import platform
from collections.abc import Iterable
from datetime import datetime
from statistics import fmean
from typing import Any

import torch

import cnnlab
from cnnlab.core.metrics import tta_name
from cnnlab.report.charts import ASSIGNMENT_TEST, ASSIGNMENT_TRAIN
from cnnlab.report.sections import Contents, Example, Loss, Picture
from cnnlab.viz.sanity import MAX_RANDOMISED_RHO

__all__ = ["SECTIONS", "document_head", "e", "render"]

# id → heading, in page order
SECTIONS: dict[str, str] = {
    "summary": "What was trained",
    "accuracy": "Final accuracy",
    "architecture": "Architecture (Table 1)",
    "curves": "Training curves",
    "per-class": "Accuracy per class",
    "confusion": "Confusion matrix",
    "calibration": "Calibration",
    "confused-pairs": "Most-confused classes",
    "misclassified": "Misclassified test images",
    "embedding": "The test set through the network's eyes",
    "mistakes": "Top losses and typical images",
    "filters": "First-layer filters",
    "features": "Feature maps",
    "gradcam": "Grad-CAM",
    "explanations": "Explanations: how far to trust them",
    "patterns": "Class models (activation maximisation)",
    "bad-labels": "Bad labels",
}

CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dde5; --accent: #2f6fde; --bad: #c0392b; --good: #1e8449; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0 auto; max-width: 1180px; padding: 1.2rem 1.5rem 3rem; background: #fff; }
h1 { font-size: 1.6rem; margin: 0.2rem 0; }
h2 { font-size: 1.25rem; border-bottom: 2px solid var(--line); padding-bottom: 0.2rem; margin-top: 2.2rem; }
h3 { font-size: 1.02rem; margin: 1.2rem 0 0.4rem; }
.sub, .note, figcaption, .muted { color: var(--muted); }
.note { font-style: italic; }
nav ol { columns: 3; padding-left: 1.2rem; margin: 0.6rem 0; }
nav a, a { color: var(--accent); text-decoration: none; }
table { border-collapse: collapse; margin: 0.4rem 0; }
th, td { border-bottom: 1px solid var(--line); padding: 0.25rem 0.7rem; text-align: left; vertical-align: top; }
th { background: #f4f6f9; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 1.2rem; margin: 0.4rem 0; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
img.plot { max-width: 100%; height: auto; display: block; margin: 0.5rem 0; border: 1px solid var(--line); }
.bar { background: #e8ecf3; width: 240px; height: 0.9rem; position: relative; }
.bar span { display: block; height: 100%; background: var(--accent); }
.grid { display: flex; flex-wrap: wrap; gap: 0.6rem; }
figure.thumb { margin: 0; width: 104px; font-size: 0.74rem; line-height: 1.25; overflow-wrap: anywhere; }
figure.thumb img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; background: #000;
                   display: block; }
figure.thumb .true { color: var(--good); } figure.thumb .pred { color: var(--bad); }
.columns { display: flex; flex-wrap: wrap; gap: 1.5rem; } .columns > div { flex: 1 1 380px; min-width: 0; }
.good { color: var(--good); } .bad { color: var(--bad); }
footer { margin-top: 3rem; font-size: 0.8rem; color: var(--muted); border-top: 1px solid var(--line);
         padding-top: 0.6rem; }
"""

# No script may run, whatever ends up in the page; images are inline; nothing is fetched.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def e(value: Any) -> str:
    """``value`` as text for HTML, attributes included."""
    return html.escape(str(value), quote=True)


def document_head(title: str, links: str, csp: str | None = None) -> str:
    """The start of every cnnlab page up to its ``<body>``: ``title`` (escaped here), an empty icon (so that no
    browser asks for ``favicon.ico``), then ``links``, the page's style or the tags that fetch it. A page
    read from disk carries its Content-Security-Policy ``csp`` in a meta tag; a served one gets it as a header."""
    policy = f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n' if csp else ""
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n' + policy
            + '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>{e(title)}</title>\n<link rel="icon" href="data:,">\n{links}\n</head>\n')


def document_end(extra: str = "") -> str:
    """The end of every written cnnlab page: what wrote it (and ``extra``, escaped here), then ``</html>``."""
    return (f"<footer>Written by cnnlab {e(cnnlab.__version__)} with torch {e(torch.__version__)} on Python\n"
            f"{e(platform.python_version())}.{' ' + e(extra) if extra else ''}</footer>\n</body>\n</html>\n")


def pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def _img(p: Picture, cls: str = "plot") -> str:
    return f'<img class="{cls}" src="{e(p.uri)}" alt="{e(p.alt)}">'


def _notes(c: Contents, section: str) -> str:
    return "".join(f'<p class="note">{e(n)}</p>' for n in c.notes.get(section, []))


def _facts(rows: Iterable[tuple[str, str]]) -> str:
    """A definition list; values are already-escaped HTML."""
    return '<dl class="facts">' + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _summary(c: Contents) -> str:
    cfg, info = c.config, c.info
    data = info.get("data", {})
    classes = c.classes
    shown = ", ".join(classes[:20]) + (f" … ({len(classes)} in all)" if len(classes) > 20 else "")
    seconds = sum(float(r.get("seconds") or 0) for r in c.epochs)
    rates = [float(r["images_per_s"]) for r in c.epochs if r.get("images_per_s")]
    amp, decided = cfg.amp, info.get("amp")
    if isinstance(decided, dict):  # runs since the CPU bf16 check say what they trained in, and why
        precision = f"{'bf16 autocast' if decided.get('used') == 'bf16' else 'fp32'} ({decided.get('why', '?')})"
    else:
        precision = f"bf16 autocast {'on' if amp else 'off' if amp is False else 'auto (on for CUDA)'}"
    rows = [
        ("model", f"{e(cfg.model)}"
                  + (f", width {e(cfg.width)}" if cfg.width is not None else "")
                  + f", {e(cfg.image_size)}×{e(cfg.image_size)} px input"
                  + (f", starting from {e(cfg.weights)}" if cfg.weights else "")
                  + (f", frozen: {e(cfg.freeze)}" if cfg.freeze else "")),
        ("dataset", e(cfg.dataset)),
        ("images", (f"{e(data.get('train', '?'))} train, {e(data.get('val', '?'))} validation, "
                    f"{e(data.get('test', '?'))} test") if data else "–"),
        ("classes", f"{len(classes)}: {e(shown)}"),
        ("recipe", e(cfg.recipe)),
        ("optimisation", e(f"SGD, lr {cfg.lr} ({cfg.schedule} schedule), momentum {cfg.momentum}"
                           f"{' (Nesterov)' if cfg.nesterov else ''}, weight decay {cfg.weight_decay}, "
                           f"batch {cfg.batch_size}, label smoothing {cfg.label_smoothing}, "
                           f"augmentation {cfg.augment}, seed {cfg.seed}")),
        ("epochs", e(f"{len(c.epochs)} finished of {cfg.epochs} planned, "
                     f"{c.last.get('step', '?')} steps")),
        ("device", e(f"{info.get('device', cfg.device)} ({info.get('device_name', '?')}), "
                     f"{info.get('threads', '?')} CPU threads, {info.get('world_size', 1)} process(es), "
                     f"{precision}")),
        ("training time", e(f"{_duration(seconds)}: the sum of the epochs' training-step time as logged "
                            "(start-up, data decoding, evaluation after each epoch and checkpoint writing not "
                            "included)" + (f"; {sum(rates) / len(rates):.0f} images/s on average" if rates else ""))),
        ("versions", e(f"cnnlab {info.get('cnnlab', '?')}, torch {info.get('torch', '?')}")),
        ("run folder", e(c.run_dir)),
        ("checkpoint scored", e(f"{c.checkpoint.name}" + (f" (after epoch {c.checkpoint_epoch})"
                                                          if c.checkpoint_epoch is not None else ""))),
    ]
    skipped = data.get("skipped_images") or []
    if skipped:
        rows.append(("images left out", e(f"{len(skipped)} unreadable: " + ", ".join(map(str, skipped[:10]))
                                          + (" …" if len(skipped) > 10 else ""))))
    if c.skipped_lines:
        rows.append(("metrics.jsonl", e(f"{c.skipped_lines} unreadable line(s) ignored")))
    return _facts(rows)


def _accuracy(c: Contents) -> str:
    last = c.last
    rows = [("train", "train_acc", ASSIGNMENT_TRAIN, "running mean over the last epoch's batches, as trained "
             "(augmentation on, weights still changing)"),
            ("validation", "val_acc", None, "held out of the training set; picks best.pt"),
            ("test", "test_acc", ASSIGNMENT_TEST, "reported only, never used to choose a checkpoint")]
    body = "".join(
        f'<tr><th>{name}</th><td class="num" id="final-{key.split("_")[0]}-acc">{pct(last.get(key))}</td>'
        f'<td class="num">{pct(goal, 0) if goal is not None else "–"}</td><td class="muted">{e(why)}</td></tr>'
        for name, key, goal, why in rows)
    html_ = ("<table><thead><tr><th>split</th><th class=\"num\">this run, epoch "
             f"{e(last.get('epoch'))}</th><th class=\"num\">assignment</th><th>what it is</th></tr></thead>"
             f"<tbody>{body}</tbody></table>"
             "<p class=\"muted\">The assignment's figures: the <code>seed</code> recipe (ResNet-18 at 224 px) after "
             "20 epochs on the full CIFAR-10 on a GPU. A short run on a subset or at small width is not expected "
             "to reach them.</p>")
    if c.test is not None:
        augmented = f", with {tta_name(c.test.tta)} as the run scored itself" if c.test.tta else ""
        html_ += (f"<p>The scored checkpoint ({e(c.checkpoint.name)}) gets <strong id=\"scored-test-acc\">"
                  f"{pct(c.test.top1)}</strong> top-1 on the {c.test.n} test images the run reported on "
                  f"(mean loss {c.test.loss:.3f}{augmented}); "
                  "the sections below are about that checkpoint.</p>")
    return html_


def _architecture(c: Contents) -> str:
    s = c.summary
    if s is None:
        return ""
    rows = "".join(
        f"<tr><td>{e(st['name'])}</td><td>{e('×'.join(str(d) for d in st['output_size']))}</td>"
        f"<td>{e(st['layers'])}</td><td class=\"num\">{st['params']:,}</td><td class=\"num\">{st['macs']:,}</td></tr>"
        for st in s["stages"])
    width = "" if s["width"] is None else f", width {s['width']}"
    return (f"<p>{e(s['model'])} at {s['image_size']}×{s['image_size']} px, {s['num_classes']} classes{width}: "
            f"<strong>{s['params'] / 1e6:.2f} M parameters</strong>, <strong>{s['macs'] / 1e6:.1f} M "
            "multiply-accumulates</strong> per image, both counted on the model (forward hooks), not quoted.</p>"
            "<table><thead><tr><th>stage</th><th>output size (C×H×W)</th><th>layers</th><th class=\"num\">params</th>"
            f"<th class=\"num\">MACs</th></tr></thead><tbody>{rows}</tbody><tfoot><tr><th>total</th><th></th><th></th>"
            f"<th class=\"num\">{s['params']:,}</th><th class=\"num\">{s['macs']:,}</th></tr></tfoot></table>")


def _curves(c: Contents) -> str:
    return ("<p>Per step: loss and accuracy of each training batch (as logged, before the step's update). "
            "Per epoch: the training figures are running means over the epoch; validation and test are scored "
            "after it.</p>" + "".join(_img(p) for p in c.curves))


def _per_class(c: Contents) -> str:
    t = c.test
    if t is None:
        return ""
    rows = []
    figures = t.figures.get("per_class_figures", {})
    for name, acc, n in sorted(t.per_class, key=lambda r: -1 if r[1] is None else r[1]):
        width = 0 if acc is None else round(100 * acc, 1)
        f = figures.get(name, {})
        rows.append(f"<tr><td>{e(name)}</td><td class=\"num\">{pct(acc, 1)}</td><td class=\"num\">{n}</td>"
                    f"<td class=\"num\">{pct(f.get('precision'), 1)}</td><td class=\"num\">{pct(f.get('f1'), 1)}</td>"
                    f"<td><div class=\"bar\" title=\"{pct(acc, 1)}\"><span style=\"width:{width}%\"></span></div>"
                    "</td></tr>")
    return (f"<p>Top-1 accuracy (recall) of each class on the test set ({t.n} images), worst first, with the "
            "precision (of the images predicted as the class, the share that are) and F1.</p>"
            "<table><thead><tr><th>class</th><th class=\"num\">accuracy</th><th class=\"num\">test images</th>"
            "<th class=\"num\">precision</th><th class=\"num\">F1</th>"
            f"<th>0 – 100%</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _calibration(c: Contents) -> str:
    """The calibration figures and reliability diagram of ``cnnlab evaluate``, before and after the
    temperature where one is kept."""
    t = c.test
    if t is None or not t.figures:
        return ""
    f = t.figures
    lo, hi = f["top1_interval"]
    top5 = f" Top-5 accuracy {pct(f['top5'], 2)}." if f["top5"] is not None else ""
    head = (f"<p>Top-1 {pct(t.top1, 2)}, 95% interval {pct(lo, 2)} – {pct(hi, 2)} (percentile bootstrap over the "
            f"{t.n} test images, 1000 resamples).{top5} A calibrated model's probabilities are right as often as "
            "they say: ECE is the mean gap between confidence and accuracy over 15 equal-width confidence bins, "
            "weighted by their images, MCE the largest gap; NLL is the test loss, Brier the mean squared distance "
            "of the probabilities from the one-hot label.</p>")
    if f["temperature"] is None:
        said = ("<p>No temperature is kept for this checkpoint: the probabilities in this report are the plain "
                f"softmax. <code>cnnlab evaluate {e(str(c.run_dir))} --calibrate</code> fits one on the run's "
                "validation images.</p>")
    else:
        said = (f"<p>The probabilities in this report (and in <code>cnnlab predict</code> and the explorer) are the "
                f"softmax of the logits divided by the temperature {f['temperature']:.3f}, fitted by "
                "<code>cnnlab evaluate --calibrate</code> on the run's validation images; it does not change "
                "any prediction.</p>")
    columns = [("softmax", f["calibration"])]
    if f["calibrated"]:
        columns.append((f"temperature {f['temperature']:.3f}", f["calibrated"]))
    names = (("ece", "ECE", True), ("mce", "MCE", True), ("nll", "NLL", False), ("brier", "Brier", False))
    rows = "".join(f"<tr><td>{label}</td>" + "".join(
        f"<td class=\"num\">{pct(col[key], 2) if percent else f'{col[key]:.4f}'}</td>" for _, col in columns)
        + "</tr>" for key, label, percent in names)
    table = ("<table id=\"calibration-figures\"><thead><tr><th>on the test set</th>"
             + "".join(f"<th class=\"num\">{e(name)}</th>" for name, _ in columns)
             + f"</tr></thead><tbody>{rows}</tbody></table>")
    return head + said + table + (_img(t.reliability) if t.reliability else "")


def _thumb(x: Example, show_true: bool = True) -> str:
    lines = [f'<span class="true">true: {e(x.true)}</span>'] if show_true else []
    lines.append(f'<span class="pred">predicted: {e(x.pred)} ({100 * x.prob:.0f}%)</span>')
    return (f'<figure class="thumb"><img src="{e(x.uri)}" alt="test image {x.index}: {e(x.true)}, '
            f'predicted {e(x.pred)}"><figcaption>#{x.index}<br>{"<br>".join(lines)}</figcaption></figure>')


def _pairs(c: Contents) -> str:
    t = c.test
    if t is None:
        return ""
    if not t.pairs:
        return "<p>No test image was misclassified.</p>"
    parts = ["<p>The (true, predicted) pairs with the most mistakes on the test set, with examples. Each direction "
             "is its own pair (a cat taken for a dog is not a dog taken for a cat); the other direction's count "
             "follows.</p>"]
    for p in t.pairs:
        parts.append(f"<h3>{e(p.true)} → {e(p.pred)}: {p.count} image{'s' if p.count != 1 else ''} "
                     f"({pct(p.share, 1)} of the {e(p.true)} test images; {p.reverse} the other way)</h3>"
                     f'<div class="grid">{"".join(_thumb(x, show_true=False) for x in p.examples)}</div>')
    return "".join(parts)


def _misclassified(c: Contents) -> str:
    t = c.test
    if t is None:
        return ""
    if not t.wrong:
        return "<p>No test image was misclassified.</p>"
    return (f"<p>{len(t.wrong)} of the {t.wrong_total} misclassified test images (of {t.n}), spread over the test "
            "set, with the true class and the prediction (its probability in brackets).</p>"
            f'<div class="grid">{"".join(_thumb(x) for x in t.wrong)}</div>')


def _embedding(c: Contents) -> str:
    f = c.embedding_facts
    if c.embedding is None:
        return ""
    return (f"<p id=\"embedding-facts\">{f['n']} test images placed by the input of {e(f['layer'])}, the last linear "
            f"layer ({f['dims']} features per image, recorded by a forward hook in the pass that scored them), with "
            f"{e(f['method'])}, seed {f['seed']}: images the network represents alike lie close together. Each point "
            "is coloured by its true class; thumbnails show a spread of the points, framed in their class's colour. "
            "<code>cnnlab visualize embedding</code> writes this map and TensorBoard's projector; the explorer's map "
            "names each point.</p>" + _img(c.embedding))


def _loss_thumb(x: Loss) -> str:
    ex = x.example
    return (f'<figure class="thumb"><img src="{e(ex.uri)}" alt="test image {ex.index}: {e(ex.true)}, '
            f'predicted {e(ex.pred)}"><figcaption>#{ex.index} loss {x.loss:.2f}<br><span class="true">true: '
            f'{e(ex.true)} ({100 * x.label_prob:.0f}%)</span><br><span class="pred">predicted: {e(ex.pred)} '
            f'({100 * ex.prob:.0f}%)</span></figcaption></figure>')


def _mistakes(c: Contents) -> str:
    parts = []
    if c.losses:
        parts.append(f"<h3>Top losses</h3><p>The {len(c.losses)} test images of highest cross-entropy with their "
                     "given label (from the logits), highest first, with the probability of the true class and of "
                     "the prediction. A confident mistake is a hard image, a confusing class, or a wrong label.</p>"
                     f'<div class="grid" id="top-losses">{"".join(_loss_thumb(x) for x in c.losses)}</div>')
    f = c.typical_facts
    if c.typical:
        shown = f" (the first {len(c.typical)} of {f['classes']})" if len(c.typical) < f["classes"] else ""
        rows = "".join(f'<tr><th>{e(t.name)}</th><td><div class="grid">{"".join(_thumb(x) for x in t.most)}</div></td>'
                       f'<td><div class="grid">{"".join(_thumb(x) for x in t.least)}</div></td></tr>'
                       for t in c.typical)
        parts.append(f"<h3>Most and least typical images of each class</h3><p>Per class{shown}, the test images "
                     f"whose penultimate features (the input of {e(f['layer'])}) point nearest to the class's mean "
                     "direction, and those farthest from it (cosine distance): what the network's representation puts "
                     "at the centre of the class and at its edges, right or wrong. Direction, not length: a feature "
                     "grows longer as the network grows surer. (Ranked by the probability of the class instead, the "
                     "least typical would be the top losses again.)</p>"
                     '<table id="typical"><thead><tr><th>class</th><th>most typical (nearest first)</th>'
                     f"<th>least typical (farthest first)</th></tr></thead><tbody>{rows}</tbody></table>")
    return "".join(parts)


def _pictures(text: str, pictures: list[Picture]) -> str:
    return (f"<p>{text}</p>" if pictures else "") + "".join(_img(p) for p in pictures)


def _gradcam(c: Contents) -> str:
    parts = []
    if c.cam_right or c.cam_wrong:
        parts.append(f"<p>Grad-CAM (Selvaraju et al. 2017) at {e(c.layers[1])}, the last spatial feature block, for "
                     "the predicted class: the regions whose "
                     "features raised that class's score most, overlaid on the input (bright = more).</p>")
    columns = [(title, pictures) for title, pictures in (("Correct predictions", c.cam_right),
                                                         ("Wrong predictions", c.cam_wrong)) if pictures]
    if columns:
        parts.append('<div class="columns">' + "".join(
            f"<div><h3>{title}</h3>{''.join(_img(p) for p in pictures)}</div>" for title, pictures in columns)
            + "</div>")
    return "".join(parts)


def _explanations(c: Contents) -> str:
    s = c.sanity
    if s is None:
        return ""
    rows = []
    for name, r, verdict in s.rows():
        cls = (' class="good"' if verdict == "passes" else ' class="bad"' if verdict.startswith("fails") else "")
        rhos = "".join(f'<td class="num">{"<b>" if step == s.judged else ""}{r.rho(step):.2f}'
                       f'{"</b>" if step == s.judged else ""}</td>' for step in s.layers)
        rows.append(f"<tr><td>{e(name)}</td>{rhos}<td class=\"num\">{fmean(r.deletion):.3f}</td>"
                    f"<td class=\"num\">{fmean(r.insertion):.3f}</td><td class=\"num\">{fmean(r.road):.3f}</td>"
                    f"<td{cls}>{e(verdict)}</td></tr>")
    steps = "".join(f'<th class="num">ρ, to {e(step)}</th>' for step in s.layers)
    images = ", ".join(str(i) for i in c.sanity_images)
    return (f"<p>A saliency map can look right and still say nothing about the network (Adebayo et al. 2018). "
            f"Each method was checked on {s.images} test images ({e(images)}) for the predicted class. "
            f"<b>ρ, to layer</b>: the Spearman rank correlation between a method's maps for the trained network and "
            f"for the network with its layers re-initialised from fc down to that layer (cascading randomisation); "
            f"a method whose maps survive re-initialising fc … {e(s.judged)} (ρ ≥ {MAX_RANDOMISED_RHO}, bold) shows "
            f"the image, not what the network learned. <b>Deletion</b> and <b>insertion</b> (Petsiuk et al. 2018): "
            f"the area under the class probability as the pixels the map ranks highest are removed (lower is better) "
            f"or put back into a blurred image (higher is better), in {s.deletion_steps} steps. <b>ROAD</b> (Rong et "
            f"al. 2022): pixels removed by noisy linear imputation, least relevant first minus most relevant first, "
            f"halved and averaged over {len(s.road_fractions)} fractions (higher is better). A method passes insertion "
            f"and ROAD when it beats the random map by two standard errors, fails when it does not beat it at all. "
            f"Deletion is shown but not judged: scattered pixels set to the mean colour destroy an image faster "
            f"than any one region, so noise beats every smooth map there. Data randomisation (a model trained on "
            f"permuted labels): {e(s.random_labels_note)}.</p>"
            f'<table id="sanity"><thead><tr><th>method</th>{steps}<th class="num">deletion AUC ↓</th>'
            '<th class="num">insertion AUC ↑</th><th class="num">ROAD ↑</th><th>verdict</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>" + "".join(_img(p) for p in c.cascade))


def _class_models(c: Contents) -> str:
    colour = f" Colours decorrelated as {e(c.pattern_colour)}." if c.pattern_colour else ""
    text = (f"Images optimised from noise ({c.pattern_steps} steps, Fourier-parameterised with jitter, as in cnnlab "
            "visualize maximize) to be classified as each class, with the probability the model gives them." + colour)
    check = c.pattern_check
    if check is not None:
        text += (" Shown to an independently trained run, a picture of the class is taken for it there too, while "
                 "noise that fools only this network scores at chance: "
                 f'<span id="class-model-check">mean p(target) {check.mean:.2f}, {sum(check.top1)} of '
                 f"{len(check.classes)} top-1</span> ({e(check.run)}).")
    return _pictures(text, c.patterns)


def _bad_labels(c: Contents) -> str:
    b = c.bad_labels
    if b is None:
        return ""
    where = (f"the {b.examined} validation images, scored by the run's model (training held them out)"
             if b.source == "validation" else
             f"the {b.examined} training images, each scored by the one of {b.folds} cross-validation models "
             "trained without it")
    origin = ("as <code>cnnlab labels</code> kept them in <code>label_issues.json</code>" if b.kept else
              "computed for this report; <code>cnnlab labels --folds K</code> examines the training images too")
    text = (f"<p>Confident learning (Northcutt et al. 2021; cleanlab's <code>find_label_issues</code>) on the "
            f"out-of-sample probabilities of {where}, {origin}: {b.found} image{'s' if b.found != 1 else ''} "
            f"({pct(b.found / max(b.examined, 1), 1)}) whose given label is likely wrong, the lowest "
            "self-confidence (the probability of the given label) first, with the class the model suggests.")
    if b.found > len(b.shown):
        text += f" The first {len(b.shown)} are shown."
    thumbs = "".join(
        f'<figure class="thumb"><img src="{e(x.uri)}" alt="training image {x.index}: given {e(x.given)}, '
        f'suggested {e(x.suggested)}"><figcaption>#{x.index}<br><span class="pred">given: {e(x.given)}</span><br>'
        f'<span class="true">suggested: {e(x.suggested)}</span><br>p(given) {x.self_confidence:.3f}</figcaption>'
        "</figure>" for x in b.shown)
    return text + "</p>" + (f'<div class="grid" id="bad-label-grid">{thumbs}</div>' if thumbs else "")


def render(c: Contents) -> str:
    """The whole page for the gathered ``Contents``."""
    bodies = {
        "summary": _summary(c),
        "accuracy": _accuracy(c),
        "architecture": _architecture(c),
        "curves": _curves(c),
        "per-class": _per_class(c),
        "confusion": _pictures("Rows are the true classes, columns the predictions; the colour is the fraction "
                               "of the true class, the numbers are counts.",
                               [c.test.confusion] if c.test and c.test.confusion else []),
        "calibration": _calibration(c),
        "confused-pairs": _pairs(c),
        "misclassified": _misclassified(c),
        "embedding": _embedding(c),
        "mistakes": _mistakes(c),
        "filters": _pictures("Every filter of the first convolution, each scaled to its own range: what colours "
                             "and edges the network looks for first. Below, one filter enlarged with its signed "
                             "weights per input channel.", c.filters),
        "features": _pictures(f"The output of every channel of {e(c.layers[0])} and {e(c.layers[1])} for one test "
                              "image, beside the input as the network saw it.", c.features),
        "gradcam": _gradcam(c),
        "explanations": _explanations(c),
        "bad-labels": _bad_labels(c),
        "patterns": _class_models(c),
    }
    nav = "".join(f'<li><a href="#{sid}">{e(title)}</a></li>' for sid, title in SECTIONS.items())
    sections = "".join(f'<section id="{sid}"><h2>{e(title)}</h2>{bodies[sid]}{_notes(c, sid)}</section>\n'
                       for sid, title in SECTIONS.items())
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in c.seconds.items())
    name = c.run_dir.resolve().name
    return document_head(f"cnnlab report: {name}", f"<style>{CSS}</style>", CSP) + f"""<body>
<header>
<h1>cnnlab report: {e(name)}</h1>
<p class="sub">{e(c.config.model)} on {e(c.config.dataset)} ·
final test accuracy {pct(c.last.get('test_acc'))} · written {datetime.now():%Y-%m-%d %H:%M}</p>
<nav><ol>{nav}</ol></nav>
</header>
<main>
{sections}</main>
""" + document_end(f"Time spent: {timing}.")
