"""One figure maker per ``cnnlab visualize`` method: run the method on a :class:`Job`, lay out the result.

The methods live in their own modules and return tensors; a maker picks the defaults (layer, images,
channels), honours every value of a multi-valued parameter (a figure, a row or a column each) or
refuses the extras, and returns matplotlib figures by file stem. :func:`cnnlab.viz.visualize`
writes them as PNGs; the report inlines them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

from cnnlab.core.errors import UserError
from cnnlab.viz.attribute import ATTRIBUTIONS
from cnnlab.viz.cam import CAMS, upsample
from cnnlab.viz.deconv import deconv as project
from cnnlab.viz.dream import dream as run_dream
from cnnlab.viz.features import feature_maps
from cnnlab.viz.filters import conv_filters
from cnnlab.viz.inputs import Batch
from cnnlab.viz.invert import feature_distance
from cnnlab.viz.invert import invert as reconstruct
from cnnlab.viz.job import Job
from cnnlab.viz.layers import default_layer, feature_layers, first_layer, require_feature_maps
from cnnlab.viz.maximize import fourier_noise, objective
from cnnlab.viz.maximize import maximize as run_max
from cnnlab.viz.render import ACTIVATION, HEAT, SIGNED, Panel, grid_figure, image, minmax, panels_figure
from cnnlab.viz.sanity import EXPLAINERS, Sanity
from cnnlab.viz.shape import target_classes
from cnnlab.viz.top_images import top_images as find_top

__all__ = ["FIGURES", "Maker", "sanity_figure"]

Figures = dict[str, Figure]  # file stem → figure


@dataclass(frozen=True)
class Maker:
    draw: Callable[[Job], Figures]
    uses: frozenset[str]  # the parameters of visualize() it reads; visualize refuses the others


def _stem(layer: str) -> str:
    return layer.replace(".", "-")


def _tag(batch: Batch) -> str:
    return batch.names[0] if len(batch.names) == 1 else f"{batch.names[0]}+{len(batch.names) - 1}"


def _probe(job: Job) -> torch.Tensor:
    """One input of the run's size: what the default layers are found with."""
    pre = job.run.preprocess
    return torch.zeros(1, pre.channels, pre.size, pre.size, device=job.run.device)


def _layers(job: Job) -> list[str]:
    return job.layers or [default_layer(job.model, _probe(job))]


def _pixels(job: Job, x: torch.Tensor) -> list[np.ndarray]:
    return [image(p) for p in job.run.preprocess.to_pixels(x)]


def _captions(job: Job, batch: Batch, targets: torch.Tensor | None = None,
              rows: list[int] | None = None) -> list[str]:
    """A caption per row: the image, its prediction, its true class and the row's target where it differs."""
    rows = list(range(len(batch.names))) if rows is None else rows
    classes = job.run.classes
    with torch.no_grad():
        probs = job.model(batch.x).softmax(1).cpu()
    lines = []
    for r, i in enumerate(rows):
        p, c = probs[i].max(0)
        text = f"{batch.names[i]}\npred {classes[c]} ({p:.2f})"
        if batch.labels[i] is not None:
            text += f"\ntrue {classes[batch.labels[i]]}"
        if targets is not None and int(targets[r]) != int(c):
            text += f"\ntarget {classes[int(targets[r])]}"
        lines.append(text)
    return lines


def _with_targets(job: Job, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Each image once per target asked for (else once, for its predicted class): the inputs, their
    targets, and which image each row shows."""
    if not job.targets:
        return batch.x, target_classes(job.model, batch.x, None), list(range(len(batch.names)))
    rows = [i for i in range(len(batch.names)) for _ in job.targets]
    return batch.x[rows], torch.tensor(job.targets * len(batch.names), device=batch.x.device), rows


def _kinds(job: Job, known: list[str]) -> list[str]:
    for kind in job.kinds:
        if kind not in known:
            raise UserError(f"unknown `kind` {kind!r} for {job.method}; choose one of: {', '.join(known)}")
    return job.kinds or known


def _wrapped(panels: list[Panel], per_row: int = 8) -> list[list[Panel]]:
    return [panels[i:i + per_row] for i in range(0, len(panels), per_row)]


def filters(job: Job) -> Figures:
    figures = {}
    for layer in job.layers or [first_layer(job.model)]:
        path, weight = conv_filters(job.model, layer)
        out_c, in_c, kh, kw = weight.shape
        chosen = job.channels or [0]
        bad = [c for c in chosen if not 0 <= c < out_c]
        if bad:
            raise UserError(f"`channel` {bad[0]} is out of range; {layer} has {out_c} filters (0 … {out_c - 1})")
        tiles = minmax(weight)
        name = _stem(layer)
        if in_c in (1, 3):
            pictures = tiles.permute(0, 2, 3, 1).numpy() if in_c == 3 else tiles[:, 0].numpy()
            figures[name] = grid_figure(pictures, f"{layer} ({path}): all {out_c} filters, {kh}×{kw}, each min–max "
                                        "scaled", labels=[str(i) for i in range(out_c)], cmap="gray", vmin=0, vmax=1)
        else:
            nf, nc = min(out_c, job.count or 32), min(in_c, 32)
            pictures = tiles[:nf, :nc].reshape(nf * nc, kh, kw).numpy()
            figures[name] = grid_figure(pictures, f"{layer} ({path}): filters 0–{nf - 1} (rows) × input channels "
                                        f"0–{nc - 1} (columns) of {out_c}×{in_c}, {kh}×{kw}, each filter min–max "
                                        "scaled", cmap="gray", vmin=0, vmax=1, cols=nc)
        names = ["R", "G", "B"] if in_c == 3 else [f"in {c}" for c in range(in_c)]
        for which in chosen:
            w = weight[which]
            panels = [Panel(tiles[which].permute(1, 2, 0).numpy(), f"filter {which}, RGB")] if in_c == 3 else []
            lim = float(w.abs().max())
            for c in range(min(in_c, 8)):
                panels.append(Panel(w[c].numpy(), f"{names[c]} weights (±{lim:.2g})", cmap=SIGNED, symmetric=True))
            figures[f"{name}_filter{which}"] = panels_figure([panels], title=f"{layer} filter {which} enlarged")
    return figures


def features(job: Job) -> Figures:
    batch = job.batch()
    pixels, captions = _pixels(job, batch.x), _captions(job, batch)
    size = job.run.preprocess.size
    figures = {}
    for layer in job.layers or [first_layer(job.model), default_layer(job.model, _probe(job))]:
        acts = require_feature_maps(feature_maps(job.model, batch.x, layer=layer).float().cpu(), layer)
        c, h, w = acts.shape[1:]
        for i, name in enumerate(batch.names):
            a = acts[i]
            figures[f"{_stem(layer)}_{name}"] = grid_figure(
                a.numpy(), f"{layer}: all {c} channels at {h}×{w} (one colour scale)",
                labels=[str(k) for k in range(c)], cmap=ACTIVATION, vmin=float(a.min()), vmax=float(a.max()),
                side=pixels[i], side_title=f"input as the network\nsaw it, {size}×{size}\n{captions[i]}",
                colorbar="activation")
    return figures


def cam(job: Job) -> Figures:
    kinds = _kinds(job, list(CAMS))
    batch = job.batch(default_count=4)
    x, targets, rows = _with_targets(job, batch)
    pixels, captions = _pixels(job, batch.x), _captions(job, batch, targets, rows)
    figures = {}
    for layer in _layers(job):
        maps = {k: CAMS[k](job.model, x, target=targets, layer=layer).cpu() for k in kinds}
        table = [[Panel(pixels[i], captions[r])] + [Panel(maps[k][r, 0].numpy(), k, HEAT, under=pixels[i])
                                                    for k in kinds] for r, i in enumerate(rows)]
        figures[f"{_stem(layer)}_{_tag(batch)}"] = panels_figure(table, title=f"class activation maps at {layer}")
    return figures


def _attribution_panel(kind: str, a: torch.Tensor) -> Panel:
    if kind in ("saliency", "smoothgrad"):
        return Panel(a.abs().amax(0).numpy(), kind, HEAT)
    if kind in ("guided-backprop", "guided-grad-cam"):
        return Panel(image(minmax(a[None])[0]), kind)
    return Panel(a.sum(0).numpy(), kind, SIGNED, symmetric=True)


def attribute(job: Job) -> Figures:
    kinds = _kinds(job, list(ATTRIBUTIONS))
    if len(job.layers) > 1:
        raise UserError(f"attribute takes one `layer` (for guided-grad-cam), not {len(job.layers)}")
    if job.layers and "guided-grad-cam" not in kinds:
        raise UserError("`layer` is used by the guided-grad-cam attribution alone; add it to `kind` or drop `layer`")
    if job.steps is not None and "integrated-gradients" not in kinds:
        raise UserError("`steps` is used by the integrated-gradients attribution alone; add it to `kind` or drop "
                        "`steps`")
    batch = job.batch(default_count=4)
    x, targets, rows = _with_targets(job, batch)
    results = {}
    for k in kinds:
        options = {"layer": job.layers[0]} if k == "guided-grad-cam" and job.layers else {}
        if k == "integrated-gradients" and job.steps:  # steps caps the refinement
            options.update(max_steps=job.steps, steps=min(32, job.steps))
        results[k] = ATTRIBUTIONS[k](job.model, x, target=targets, **options).float().cpu()
    pixels, captions = _pixels(job, batch.x), _captions(job, batch, targets, rows)
    table = [[Panel(pixels[i], captions[r])] + [_attribution_panel(k, results[k][r]) for k in kinds]
             for r, i in enumerate(rows)]
    return {_tag(batch): panels_figure(table, title="pixel attributions")}


def top_images(job: Job) -> Figures:
    images, _ = job.test_set()
    pre = job.run.preprocess
    figures = {}
    for layer in _layers(job):
        for ch in job.channels or [0]:
            top = find_top(job.model, images, pre, layer=layer, channel=ch, count=job.count or 9)
            x = pre.to_input(images[top.indices])
            pixels = _pixels(job, x)
            heat = upsample(top.maps[:, None].float(), x)[:, 0]
            first = [Panel(p, f"#{int(i)}  max {float(s):.2f}", box=b)
                     for p, i, s, b in zip(pixels, top.indices, top.scores, top.boxes)]
            second = [Panel(heat[k].numpy(), "", HEAT, under=pixels[k]) for k in range(len(pixels))]
            figures[f"{_stem(layer)}_ch{ch}"] = panels_figure(
                [first, second], title=f"{layer} channel {ch}: the test images that excite it most "
                                       "(box: effective receptive field of the strongest unit)")
    return figures


def deconv(job: Job) -> Figures:
    batch = job.batch()
    pixels, captions = _pixels(job, batch.x), _captions(job, batch)
    figures = {}
    for layer in _layers(job):
        acts = require_feature_maps(feature_maps(job.model, batch.x, layer=layer), layer)
        strongest = acts.flatten(2).amax(2)
        channels = job.channels or strongest[0].topk(min(job.count or 4, acts.shape[1])).indices.tolist()
        projections = {c: project(job.model, batch.x, layer=layer, channels=c).float().cpu() for c in channels}
        table = [[Panel(pixels[i], captions[i])] +
                 [Panel(image(minmax(projections[c][i][None])[0]), f"ch {c} (max {float(strongest[i, c]):.2f})")
                  for c in channels] for i in range(len(batch.names))]
        figures[f"{_stem(layer)}_{_tag(batch)}"] = panels_figure(
            table, title=f"{layer}: strongest activation of each channel projected to pixels (deconvnet)")
    return figures


def invert(job: Job) -> Figures:
    layers = job.layers or feature_layers(job.model, _probe(job))
    batch = job.batch()
    pixels = _pixels(job, batch.x)
    columns = {}
    for layer in layers:
        x = reconstruct(job.model, batch.x, layer=layer, preprocess=job.run.preprocess,
                        steps=300 if job.steps is None else job.steps)
        columns[layer] = (_pixels(job, x), feature_distance(job.model, x, batch.x, layer).tolist())
    table = [[Panel(pixels[i], f"{name} (original)")] +
             [Panel(columns[layer][0][i], f"from {layer}\nrel. dist {columns[layer][1][i]:.2f}") for layer in layers]
             for i, name in enumerate(batch.names)]
    return {_tag(batch): panels_figure(table, title="inverted representations (Mahendran & Vedaldi 2015)")}


def _noise(job: Job, n: int) -> torch.Tensor:
    """n starting images for activation maximisation, as network input."""
    pre = job.run.preprocess
    pixels = fourier_noise((n, pre.channels, pre.size, pre.size)).to(job.run.device)
    return pre.normalizer().to(pixels)(pixels)


def _class_models(job: Job, classes: list[int], steps: int) -> Figure:
    r = job.run
    x = run_max(job.model, _noise(job, len(classes)), target=classes, preprocess=r.preprocess, steps=steps)
    with torch.no_grad():
        probs = job.model(x).softmax(1).cpu()
    panels = [Panel(p, f"{r.classes[c]}\np = {float(probs[k, c]):.2f}")
              for k, (p, c) in enumerate(zip(_pixels(job, x), classes))]
    return panels_figure(_wrapped(panels), title="class models: images the network takes for each class")


def _channel_models(job: Job, layer: str, channels: list[int], steps: int) -> Figure:
    start = _noise(job, len(channels))
    x = run_max(job.model, start, layer=layer, channels=channels, preprocess=job.run.preprocess, steps=steps)
    with torch.no_grad():
        before = objective(job.model, start, layer=layer, channels=channels).cpu()
        after = objective(job.model, x, layer=layer, channels=channels).cpu()
    panels = [Panel(p, f"ch {c}\n{float(b):.2f} → {float(a):.2f}")
              for p, c, b, a in zip(_pixels(job, x), channels, before, after)]
    return panels_figure(_wrapped(panels),
                         title=f"{layer}: images that maximise each channel's mean activation (start → end)")


def maximize(job: Job) -> Figures:
    steps = 256 if job.steps is None else job.steps
    if job.targets:
        if job.layers or job.channels:
            raise UserError("maximize draws classes (`target`) or channels of a layer (`layer`, `channel`), "
                            "not both at once")
        return {"classes": _class_models(job, job.targets, steps)}
    figures = {}
    for layer in _layers(job):
        if layer == "fc":  # its channels are the classes
            figures["classes"] = _class_models(job, job.channels or list(range(len(job.run.classes))), steps)
        else:
            channels = job.channels or list(range(job.count or 8))
            figures[f"{_stem(layer)}_ch{channels[0]}-{channels[-1]}"] = _channel_models(job, layer, channels, steps)
    return figures


def dream(job: Job) -> Figures:
    batch = job.batch()
    originals = _pixels(job, batch.x)
    figures = {}
    stages = feature_layers(job.model, _probe(job))  # the stage before the last, where there are stages
    for layer in job.layers or (stages[-2:-1] if len(stages) > 2 else stages[-1:]):
        x = run_dream(job.model, batch.x, layer=layer, preprocess=job.run.preprocess,
                      steps=20 if job.steps is None else job.steps)
        table = [[Panel(a, name), Panel(b, f"dreamed at {layer}")]
                 for name, a, b in zip(batch.names, originals, _pixels(job, x))]
        figures[f"{_stem(layer)}_{_tag(batch)}"] = panels_figure(table, title="DeepDream")
    return figures


def sanity_figure(result: Sanity, picture: np.ndarray, caption: str) -> Figure:
    """The cascading randomisation of one image: a row per method, the trained network's map and then
    the map after each cascade step, with the step's mean rank correlation over all the images."""
    rows = [[Panel(picture, caption)]]
    for name, maps in result.maps.items():
        if name not in result.methods:
            continue
        signed = EXPLAINERS[name].signed
        cells = [Panel(maps[0].numpy(), f"{name}\ntrained network", SIGNED if signed else HEAT, symmetric=signed)]
        for layer, m in zip(result.layers, maps[1:]):
            rho = result.methods[name].rho(layer)
            cells.append(Panel(m.numpy(), f"down to {layer} re-init.\nmean ρ {rho:.2f}", SIGNED if signed else HEAT,
                               symmetric=signed))
        rows.append(cells)
    return panels_figure(rows, title="cascading randomisation: each map after re-initialising the layers from fc "
                                     "down to the one named (Adebayo et al. 2018)")


IMAGES = frozenset({"image", "index", "count"})
FIGURES: dict[str, Maker] = {
    "filters": Maker(filters, frozenset({"layer", "channel", "count"})),
    "features": Maker(features, IMAGES | {"layer"}),
    "top-images": Maker(top_images, frozenset({"layer", "channel", "count"})),
    "deconv": Maker(deconv, IMAGES | {"layer", "channel"}),
    "invert": Maker(invert, IMAGES | {"layer", "steps"}),
    "maximize": Maker(maximize, frozenset({"layer", "channel", "target", "count", "steps"})),
    "dream": Maker(dream, IMAGES | {"layer", "steps"}),
    "cam": Maker(cam, IMAGES | {"layer", "target", "kind"}),
    "attribute": Maker(attribute, IMAGES | {"layer", "target", "kind", "steps"}),
}
