"""``visualize(method, path, …)``: load a run, pick the images, run one method, write its figures.

This is what ``cnnlab visualize`` calls; each method's figures come from :mod:`cnnlab.viz.figures`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from cnnlab import run as runs
from cnnlab.core.device import pick_device
from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write
from cnnlab.viz import render
from cnnlab.viz.figures import FIGURES, sanity_figure
from cnnlab.viz.inputs import Batch, from_files, from_test_set, parse_target
from cnnlab.viz.job import Job
from cnnlab.viz.layers import layer_path
from cnnlab.viz.sanity import Sanity, choices, sanity_checks, train_on_permuted_labels

__all__ = ["sanity", "visualize"]

SANITY_IMAGES = 8  # test images the checks run on by default, spread over the test set
# Training on permuted labels is affordable when an epoch costs at most this many multiply-accumulates
# (forward and backward ≈ 3 × the forward's): about a minute of a laptop CPU.
RANDOM_LABELS_BUDGET = 2e12


def _listed(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def visualize(method: str, path: str | Path, *, image: str | Sequence[str] | None = None,
              index: int | Sequence[int] | None = None, count: int | None = None,
              layer: str | Sequence[str] | None = None, target: str | int | Sequence[str | int] | None = None,
              channel: int | Sequence[int] | None = None, kind: str | Sequence[str] | None = None,
              steps: int | None = None, out: str | Path | None = None, tensorboard: bool = False,
              device: str = "auto", data_dir: str | None = None) -> list[Path]:
    """Run visualisation ``method`` on the run folder or checkpoint ``path``; returns the PNGs written.

    They go to ``RUN_DIR/viz/<method>/`` (or ``out``) and, with ``tensorboard``, also to the run's
    TensorBoard as images tagged ``viz/<method>/<name>``. A parameter the method does not use is
    refused, and so are values of a multi-valued one that it cannot use.
    """
    if method == "sanity":
        unused = [name for name, value in dict(target=target, channel=channel, steps=steps).items()
                  if value is not None]
        if unused:
            raise UserError(f"sanity does not use `{unused[0]}`; it uses `image`, `index`, `count`, `layer`, `kind`")
        return sanity(path, image=image, index=index, count=count, layer=layer, kind=kind, out=out, device=device,
                      data_dir=data_dir)[1]
    if method not in FIGURES:
        raise UserError(f"unknown method {method!r}; choose one of: {', '.join([*FIGURES, 'sanity'])}")
    maker = FIGURES[method]
    given = dict(image=image, index=index, count=count, layer=layer, target=target, channel=channel, kind=kind,
                 steps=steps)
    unused = [name for name, value in given.items() if value is not None and name not in maker.uses]
    if unused:
        raise UserError(f"{method} does not use `{unused[0]}`; it uses "
                        f"{', '.join(f'`{p}`' for p in given if p in maker.uses)}")
    if image is not None and index is not None:
        raise UserError("give either `image` or `index`, not both")
    for name, value, least in (("count", count, 1), ("steps", steps, 0)):
        if value is not None and value < least:
            raise UserError(f"`{name}` must be at least {least} (got {value})")
    loaded = runs.load(path, device=pick_device(device))
    for name in _listed(layer):
        layer_path(loaded.model, name)  # an unknown layer fails before any work is done
    out_dir = Path(out) if out else (loaded.run_dir or loaded.path.parent) / "viz" / method
    job = Job(method, loaded, [str(n) for n in _listed(layer)],
              [t for t in (parse_target(v, loaded.classes) for v in _listed(target)) if t is not None],
              [int(c) for c in _listed(channel)], [str(k) for k in _listed(kind)], count, steps,
              [str(p) for p in _listed(image)], [int(i) for i in _listed(index)], data_dir)
    pngs = {out_dir / f"{name}.png": render.png(fig) for name, fig in maker.draw(job).items()}
    for png, data in pngs.items():
        atomic_write(png, data)
    if tensorboard:
        log_dir = (loaded.run_dir / "tb") if loaded.run_dir else out_dir / "tb"
        _to_tensorboard(log_dir, pngs, f"viz/{method}")
    return list(pngs)


def _to_tensorboard(log_dir: Path, pngs: dict[Path, bytes], prefix: str) -> None:
    """The figures as images in the run's TensorBoard, tagged ``viz/<method>/<file stem>``."""
    writer = SummaryWriter(str(log_dir))
    try:
        for png, data in pngs.items():
            with Image.open(io.BytesIO(data)) as img:
                pixels = np.asarray(img.convert("RGB"))
            writer.add_image(f"{prefix}/{png.stem}", torch.from_numpy(pixels.copy()), dataformats="HWC")
    finally:
        writer.close()


def spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (test sets are often ordered by class)."""
    if n <= k:
        return list(range(n))
    return torch.linspace(0, n - 1, k).round().long().tolist()


def _macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of one image like ``x``, counted on conv and linear layers."""
    total = 0

    def count(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel() * (module.weight[0].numel())

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def _random_labels_model(loaded: runs.LoadedRun, random_labels: str | int | None, x: torch.Tensor,
                         data_dir: str | None) -> tuple[torch.nn.Module | None, str]:
    """The model for the data randomisation test, and a line saying what it is."""
    if random_labels in (None, "none", 0, "0"):
        return None, "not run (give `random_labels`: a run trained on permuted labels, or epochs to train one)"
    text = str(random_labels)
    if text.startswith("-") and text[1:].isdigit():  # argparse hands "-1" over as a value, not a flag
        raise UserError(f"`random_labels` {text} is not a number of epochs: give 1 or more epochs, a run trained "
                        "on permuted labels, auto or none")
    if text != "auto" and not text.isdigit():
        other = runs.load(text, device=loaded.device)
        if other.spec != loaded.spec:
            raise UserError(f"`random_labels` {text} holds a {other.spec.name} of width {other.spec.width} for "
                            f"{other.spec.num_classes} classes; the run checked is a {loaded.spec.name} of width "
                            f"{loaded.spec.width} for {loaded.spec.num_classes}: give the same architecture")
        return other.model, f"the model of {other.path}, trained on permuted labels"
    from cnnlab.data import load_dataset
    from cnnlab.data.splits import split

    cfg = loaded.config
    if cfg is None:
        return None, "not run: the checkpoint does not say which dataset it was trained on"
    try:
        data = split(load_dataset(cfg.dataset, data_dir=data_dir or cfg.data_dir, skip_bad_images=cfg.skip_bad_images),
                     cfg.limit_train, cfg.limit_test, cfg.val_split)
    except UserError as e:
        if text != "auto":
            raise
        return None, f"not run: the training images could not be read ({e})"
    epochs = 1 if text == "auto" else int(text)
    cost = 3 * _macs(loaded.model, x) * len(data.train_y) * epochs
    if text == "auto" and cost > RANDOM_LABELS_BUDGET:
        return None, (f"not run: an epoch on permuted labels would cost {cost:.1e} multiply-accumulates; "
                      "give `random_labels` (epochs, or a run trained on permuted labels) to run it")
    model = train_on_permuted_labels(loaded.model, data.train_x, data.train_y,
                                     lambda u: loaded.preprocess.to_input(u), epochs=epochs)
    return model, (f"a fresh {loaded.spec.name} trained here for {epochs} epoch{'s' if epochs != 1 else ''} on the "
                   f"{len(data.train_y)} training images with their labels permuted")


def sanity(path: str | Path, *, image: str | Sequence[str] | None = None, index: int | Sequence[int] | None = None,
           count: int | None = None, layer: str | Sequence[str] | None = None, kind: str | Sequence[str] | None = None,
           random_labels: str | int | None = "auto", out: str | Path | None = None, device: str = "auto",
           data_dir: str | None = None, progress: Any = None) -> tuple[Sanity, list[Path]]:
    """``cnnlab visualize sanity``: check every CAM and attribution method on a run (see
    :mod:`cnnlab.viz.sanity`); writes ``sanity.json`` and the cascading randomisation figure to
    ``RUN_DIR/viz/sanity/`` (or ``out``) and returns the results and the files written.

    Images: ``image`` files, ``index`` test images, or ``count`` (default 8) test images spread over the
    test set. ``layer``: the cascade steps to measure (default all). ``random_labels``: a run trained on
    permuted labels, a number of epochs to train one here, ``"auto"`` (one epoch when that is cheap) or
    ``None``.
    """
    if image is not None and index is not None:
        raise UserError("give either `image` or `index`, not both")
    if count is not None and count < 1:
        raise UserError(f"`count` must be at least 1 (got {count})")
    loaded = runs.load(path, device=pick_device(device))
    layers = [str(n) for n in _listed(layer)]
    for name in layers:
        layer_path(loaded.model, name)
    kinds = [str(k) for k in _listed(kind)]
    choices(loaded.model, kinds or None, layers or None)  # mistakes fail before any work is done
    pre = loaded.preprocess
    if image is not None:
        batch = from_files([str(p) for p in _listed(image)], pre)
    else:
        x, y = loaded.test_set(data_dir=data_dir)
        chosen = [int(i) for i in _listed(index)] or spread(len(y), count or SANITY_IMAGES)
        batch = from_test_set(x, y, chosen, pre)
    batch = Batch(batch.x.to(loaded.device), batch.names, batch.labels)
    other, note = _random_labels_model(loaded, random_labels, batch.x, data_dir)
    result = sanity_checks(loaded.model, batch.x, methods=kinds or None,
                           layers=layers or None, random_labels=other, random_labels_note=note, progress=progress)
    result.names = batch.names
    out_dir = Path(out) if out else (loaded.run_dir or loaded.path.parent) / "viz" / "sanity"
    with torch.no_grad():
        probs = loaded.model(batch.x[:1]).softmax(1)[0]
    p, c = probs.max(0)
    caption = f"{batch.names[0]}\npred {loaded.classes[int(c)]} ({float(p):.2f})"
    figure = sanity_figure(result, render.image(pre.to_pixels(batch.x[:1])[0]), caption)
    files = {out_dir / "cascade.png": render.png(figure),
             out_dir / "sanity.json": (json.dumps(result.to_json(), indent=1) + "\n").encode()}
    for file, data in files.items():
        atomic_write(file, data)
    return result, list(files)
