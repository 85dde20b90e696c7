"""One figure-maker per ``cnnlab visualize`` method: run the method on a :class:`Job`, write PNGs.

The methods themselves live in their own modules and return tensors; this module only picks the
defaults (layer, images, channels), lays the results out and names the files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from cnnlab.core.errors import UserError
from cnnlab.viz import render
from cnnlab.viz.command import Job
from cnnlab.viz.inputs import Batch
from cnnlab.viz.layers import require_feature_maps
from cnnlab.viz.render import HEAT, SIGNED, Panel, image, minmax, save_grid, save_panels

__all__ = ["FIGURES"]

STAGES = ("conv1", "conv2_x", "conv3_x", "conv4_x", "conv5_x")


def _pixels(job: Job, x: torch.Tensor) -> list[np.ndarray]:
    return [image(p) for p in job.run.preprocess.to_pixels(x)]


def _captions(job: Job, batch: Batch, targets: torch.Tensor | None = None) -> list[str]:
    classes = job.run.classes
    with torch.no_grad():
        probs = job.model(batch.x).softmax(1).cpu()
    lines = []
    for i, name in enumerate(batch.names):
        p, c = probs[i].max(0)
        text = f"{name}\npred {classes[c]} ({p:.2f})"
        if batch.labels[i] is not None:
            text += f"\ntrue {classes[batch.labels[i]]}"
        if targets is not None and int(targets[i]) != int(c):
            text += f"\ntarget {classes[int(targets[i])]}"
        lines.append(text)
    return lines


def _kinds(job: Job, known: Sequence[str], what: str) -> list[str]:
    for kind in job.kinds:
        if kind not in known:
            raise UserError(f"unknown {what} {kind!r}; choose one of: {', '.join(known)}")
    return job.kinds or list(known)


def _rows(panels: list[Panel], per_row: int = 8) -> list[list[Panel]]:
    return [panels[i:i + per_row] for i in range(0, len(panels), per_row)]


def filters(job: Job) -> list:
    from cnnlab.viz.filters import conv_filters, filter_tiles

    layer = job.layers[0] if job.layers else "conv1"
    path, weight = conv_filters(job.model, layer)
    out_c, in_c, kh, kw = weight.shape
    tiles = filter_tiles(weight)
    name = layer.replace(".", "-")
    if in_c in (1, 3):
        pictures = tiles.permute(0, 2, 3, 1).numpy() if in_c == 3 else tiles[:, 0].numpy()
        grid = save_grid(job.out_dir / f"{name}.png", pictures, f"{layer} ({path}): all {out_c} filters, {kh}×{kw}, "
                         "each min–max scaled", labels=[str(i) for i in range(out_c)], cmap="gray", vmin=0, vmax=1)
    else:
        nf, nc = min(out_c, job.count or 32), min(in_c, 32)
        pictures = tiles[:nf, :nc].reshape(nf * nc, kh, kw).numpy()
        grid = save_grid(job.out_dir / f"{name}.png", pictures,
                         f"{layer} ({path}): filters 0–{nf - 1} (rows) × input channels 0–{nc - 1} (columns) "
                         f"of {out_c}×{in_c}, {kh}×{kw}, each filter min–max scaled",
                         cmap="gray", vmin=0, vmax=1, cols=nc)
    which = job.channels[0] if job.channels else 0
    if not 0 <= which < out_c:
        raise UserError(f"--channel {which} is out of range; {layer} has {out_c} filters (0 … {out_c - 1})")
    w = weight[which]
    panels = [Panel(tiles[which].permute(1, 2, 0).numpy(), f"filter {which}, RGB")] if in_c == 3 else []
    names = ["R", "G", "B"] if in_c == 3 else [f"in {c}" for c in range(in_c)]
    lim = float(w.abs().max())
    for c in range(min(in_c, 8)):
        panels.append(Panel(w[c].numpy(), f"{names[c]} weights (±{lim:.2g})", cmap=SIGNED, symmetric=True))
    big = save_panels(job.out_dir / f"{name}_filter{which}.png", [panels], title=f"{layer} filter {which} enlarged")
    return [grid, big]


def features(job: Job) -> list:
    from cnnlab.viz.features import feature_maps

    layers = job.layers or ["conv1", "conv5_x"]
    batch = job.batch()
    maps = feature_maps(job.model, batch.x, layers)
    pixels, captions = _pixels(job, batch.x), _captions(job, batch)
    written = []
    for layer in layers:
        acts = require_feature_maps(maps[layer].float().cpu(), layer)
        c, h, w = acts.shape[1:]
        for i, name in enumerate(batch.names):
            a = acts[i]
            written.append(save_grid(
                job.out_dir / f"{layer.replace('.', '-')}_{name}.png", a.numpy(),
                f"{layer}: all {c} channels at {h}×{w} (one colour scale)", labels=[str(k) for k in range(c)],
                cmap=render.ACTIVATION, vmin=float(a.min()), vmax=float(a.max()), side=pixels[i],
                side_title=f"input as the network\nsaw it, {job.size}×{job.size}\n{captions[i]}",
                colorbar="activation"))
    return written


def cam(job: Job) -> list:
    from cnnlab.viz.cam import CAMS, predicted
    from cnnlab.viz.cam import cam as run_cam

    kinds = _kinds(job, list(CAMS), "CAM (--kind)")
    layer = job.layers[0] if job.layers else "conv5_x"
    batch = job.batch(default_count=4)
    t = predicted(job.model, batch.x, job.target())
    maps = {k: run_cam(job.model, batch.x, t, layer, k).cpu() for k in kinds}
    pixels, captions = _pixels(job, batch.x), _captions(job, batch, t)
    rows = [[Panel(pixels[i], captions[i])] + [Panel(maps[k][i, 0].numpy(), k, HEAT, under=pixels[i]) for k in kinds]
            for i in range(len(batch.names))]
    return [save_panels(job.out_dir / f"{layer.replace('.', '-')}_{job.tag(batch)}.png", rows,
                        title=f"class activation maps at {layer}")]


def _attribution_panel(kind: str, a: torch.Tensor) -> Panel:
    if kind in ("saliency", "smoothgrad"):
        return Panel(a.abs().amax(0).numpy(), kind, HEAT)
    if kind in ("guided-backprop", "guided-grad-cam"):
        rgb = minmax(a[None])[0]
        return Panel(image(rgb), kind)
    return Panel(a.sum(0).numpy(), kind, SIGNED, symmetric=True)


def attribute(job: Job) -> list:
    from cnnlab.viz.attribute import ATTRIBUTIONS
    from cnnlab.viz.attribute import attribute as run_attribute
    from cnnlab.viz.cam import predicted

    kinds = _kinds(job, list(ATTRIBUTIONS), "attribution (--kind)")
    layer = job.layers[0] if job.layers else "conv5_x"
    batch = job.batch(default_count=4)
    t = predicted(job.model, batch.x, job.target())
    results = {}
    for k in kinds:
        options = {"layer": layer} if k == "guided-grad-cam" else {}
        if k == "integrated-gradients" and job.steps:  # --steps caps the refinement
            options.update(max_steps=job.steps, steps=min(32, job.steps))
        results[k] = run_attribute(job.model, batch.x, t, k, **options).float().cpu()
    pixels, captions = _pixels(job, batch.x), _captions(job, batch, t)
    rows = [[Panel(pixels[i], captions[i])] + [_attribution_panel(k, results[k][i]) for k in kinds]
            for i in range(len(batch.names))]
    return [save_panels(job.out_dir / f"{job.tag(batch)}.png", rows, title="pixel attributions")]


def top_images(job: Job) -> list:
    from cnnlab.viz.cam import upsample
    from cnnlab.viz.top_images import top_images as find

    layer = job.layers[0] if job.layers else "conv5_x"
    images, _ = job.test_set()
    written = []
    for ch in job.channels or [0]:
        top = find(job.model, images, layer, ch, job.size, job.run.preprocess.mean, job.run.preprocess.std, job.count or 9)
        x = job.run.preprocess.to_input(images[top.indices])
        pixels = _pixels(job, x)
        heat = upsample(top.maps[:, None].float(), x)[:, 0]
        first = [Panel(p, f"#{int(i)}  max {float(s):.2f}", box=b)
                 for p, i, s, b in zip(pixels, top.indices, top.scores, top.boxes)]
        second = [Panel(heat[k].numpy(), "", HEAT, under=pixels[k]) for k in range(len(pixels))]
        written.append(save_panels(job.out_dir / f"{layer.replace('.', '-')}_ch{ch}.png", [first, second],
                                   title=f"{layer} channel {ch}: the test images that excite it most "
                                         "(box: effective receptive field of the strongest unit)"))
    return written


def deconv(job: Job) -> list:
    from cnnlab.viz.deconv import deconv as project
    from cnnlab.viz.features import feature_maps

    layer = job.layers[0] if job.layers else "conv5_x"
    batch = job.batch()
    acts = require_feature_maps(feature_maps(job.model, batch.x, [layer])[layer], layer)
    strongest = acts.flatten(2).amax(2)
    channels = job.channels or strongest[0].topk(min(job.count or 4, acts.shape[1])).indices.tolist()
    projections = {c: project(job.model, batch.x, layer, c).float().cpu() for c in channels}
    pixels, captions = _pixels(job, batch.x), _captions(job, batch)
    rows = [[Panel(pixels[i], captions[i])] +
            [Panel(image(minmax(projections[c][i][None])[0]), f"ch {c} (max {float(strongest[i, c]):.2f})")
             for c in channels] for i in range(len(batch.names))]
    return [save_panels(job.out_dir / f"{layer.replace('.', '-')}_{job.tag(batch)}.png", rows,
                        title=f"{layer}: strongest activation of each channel projected to pixels (deconvnet)")]


def invert(job: Job) -> list:
    from cnnlab.viz.invert import feature_distance
    from cnnlab.viz.invert import invert as reconstruct
    from cnnlab.viz.layers import valid_names

    layers = job.layers or [n for n in valid_names(job.model) if n in STAGES]
    batch = job.batch()
    r = job.run
    pixels = _pixels(job, batch.x)
    columns = {}
    for layer in layers:
        x = reconstruct(job.model, batch.x, layer, r.preprocess.mean, r.preprocess.std, steps=300 if job.steps is None else job.steps)
        columns[layer] = (_pixels(job, x), feature_distance(job.model, x, batch.x, layer).tolist())
    rows = [[Panel(pixels[i], f"{name} (original)")] +
            [Panel(columns[l][0][i], f"from {l}\nrel. dist {columns[l][1][i]:.2f}") for l in layers]
            for i, name in enumerate(batch.names)]
    return [save_panels(job.out_dir / f"{job.tag(batch)}.png", rows,
                        title="inverted representations (Mahendran & Vedaldi 2015)")]


def maximize(job: Job) -> list:
    from cnnlab.viz.maximize import objective
    from cnnlab.viz.maximize import maximize as run_max

    r, steps = job.run, 256 if job.steps is None else job.steps
    common = dict(image_size=job.size, mean=r.preprocess.mean, std=r.preprocess.std, steps=steps, in_channels=r.spec.in_channels)
    if job.targets or job.layers == ["fc"]:
        classes = job.targets or list(range(len(r.classes)))
        x = run_max(job.model, classes=classes, **common)
        with torch.no_grad():
            probs = job.model(x).softmax(1).cpu()
        panels = [Panel(p, f"{r.classes[c]}\np = {float(probs[k, c]):.2f}")
                  for k, (p, c) in enumerate(zip(_pixels(job, x), classes))]
        name, title = "classes", "class models: images the network takes for each class"
    else:
        layer = job.layers[0] if job.layers else "conv5_x"
        channels = job.channels or list(range(job.count or 8))
        picks = torch.tensor(channels)
        start = run_max(job.model, layer=layer, channels=channels, **{**common, "steps": 0})
        x = run_max(job.model, layer=layer, channels=channels, **common)
        with torch.no_grad():
            before = objective(job.model, start, layer, picks, None).cpu()
            after = objective(job.model, x, layer, picks, None).cpu()
        panels = [Panel(p, f"ch {c}\n{float(b):.2f} → {float(a):.2f}")
                  for p, c, b, a in zip(_pixels(job, x), channels, before, after)]
        name, title = f"{layer.replace('.', '-')}_ch{channels[0]}-{channels[-1]}", \
            f"{layer}: images that maximise each channel's mean activation (start → end)"
    return [save_panels(job.out_dir / f"{name}.png", _rows(panels), title=title)]


def dream(job: Job) -> list:
    from cnnlab.viz.dream import dream as run_dream

    layer = job.layers[0] if job.layers else "conv4_x"
    batch = job.batch()
    r = job.run
    x = run_dream(job.model, batch.x, layer, r.preprocess.mean, r.preprocess.std, steps=20 if job.steps is None else job.steps)
    rows = [[Panel(a, f"{name}"), Panel(b, f"dreamed at {layer}")]
            for name, a, b in zip(batch.names, _pixels(job, batch.x), _pixels(job, x))]
    return [save_panels(job.out_dir / f"{layer.replace('.', '-')}_{job.tag(batch)}.png", rows, title="DeepDream")]


FIGURES: dict[str, Callable[[Job], list]] = {
    "filters": filters,
    "features": features,
    "top-images": top_images,
    "deconv": deconv,
    "invert": invert,
    "maximize": maximize,
    "dream": dream,
    "cam": cam,
    "attribute": attribute,
}
