"""``cnnlab visualize``: open a run, have the inspector run one method, write its figures.

The choices and their defaults are the inspector's (:mod:`cnnlab.inspect`); this writes the figures
of :mod:`cnnlab.visualize.figures` as PNGs (and to TensorBoard), and the sanity table as JSON.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from cnnlab.core.files import atomic_write
from cnnlab.inspect import checks, views
from cnnlab.inspect.inspector import Inspection
from cnnlab.inspect.registry import METHODS, Choices
from cnnlab.inspect.results import Sanity
from cnnlab.visualize import render
from cnnlab.visualize.figures import draw, sanity_figure
from cnnlab.visualize.projector import projector

__all__ = ["sanity", "visualize"]


def _out_dir(inspection: Inspection, method: str, out: str | Path | None) -> Path:
    loaded = inspection.run
    return Path(out) if out else (loaded.run_dir or loaded.path.parent) / "viz" / method


def visualize(method: str, path: str | Path, *, out: str | Path | None = None, tensorboard: bool = False,
              device: str = "auto", data_dir: str | None = None, **choices: Any) -> list[Path]:
    """Run visualisation ``method`` on the run folder or checkpoint ``path``; returns the PNGs written.

    ``choices`` are those of :class:`cnnlab.inspect.Choices` (``image``, ``index``, ``count``, ``layer``,
    ``target``, ``channel``, ``kind``, ``steps``: one value or a sequence each). The PNGs go to
    ``RUN_DIR/viz/<method>/`` (or ``out``) and, with ``tensorboard``, also to the run's TensorBoard as
    images tagged ``viz/<method>/<name>``. A choice the method does not use is refused, and so are
    values of a multi-valued one that it cannot use. ``embedding`` also writes TensorBoard's projector (the
    features, the classes and a sprite of the images) into the run's TensorBoard folder, ``RUN_DIR/tb``.
    """
    chosen = Choices.of(**choices)
    if method == "sanity":
        return sanity(path, out=out, device=device, data_dir=data_dir, **choices)[1]
    views.method(method).check(chosen)  # mistakes fail before the run is loaded
    inspection = Inspection.open(path, device=device, data_dir=data_dir)
    out_dir = _out_dir(inspection, method, out)
    results = views.show(inspection, method, chosen)
    pngs = {out_dir / f"{name}.png": render.png(fig) for result in results for name, fig in draw(result).items()}
    for png, data in pngs.items():
        atomic_write(png, data)
    log_dir = (inspection.run.run_dir / "tb") if inspection.run.run_dir else out_dir / "tb"
    if tensorboard:
        _to_tensorboard(log_dir, pngs, f"viz/{method}")
    if method == "embedding":  # the projector is the embedding's TensorBoard view: always written
        projector(inspection, results[0], log_dir)
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


def sanity(path: str | Path, *, random_labels: checks.RandomLabels = "auto", out: str | Path | None = None,
           device: str = "auto", data_dir: str | None = None, progress: Callable[[str], None] | None = None,
           **choices: Any) -> tuple[Sanity, list[Path]]:
    """``cnnlab visualize sanity``: check every CAM and attribution method on a run (see
    :mod:`cnnlab.viz.sanity`); writes ``sanity.json`` and the cascading randomisation figure to
    ``RUN_DIR/viz/sanity/`` (or ``out``) and returns the results and the files written.

    Choices: ``image`` files, ``index`` test images, or ``count`` (default 8) test images spread over the
    test set; ``layer``: the cascade steps to measure (default all); ``kind``: the methods (default all).
    ``random_labels``: a run (a ``Path``) trained on permuted labels, a number of epochs to train one here,
    ``"auto"`` (one epoch when that is cheap) or ``None``.
    """
    chosen = Choices.of(**choices)
    method = METHODS["sanity"]
    method.check(chosen)
    inspection = Inspection.open(path, device=device, data_dir=data_dir)
    checks.check_steps(inspection, chosen.layer)
    images = views.images_for(inspection, method, chosen)
    result = checks.sanity(inspection, images, kinds=chosen.kind, layers=chosen.layer, random_labels=random_labels,
                           progress=progress)
    out_dir = _out_dir(inspection, "sanity", out)
    figure = sanity_figure(result, render.image(images.pixels[0]), inspection.caption(images, 0, true=False))
    files = {out_dir / "cascade.png": render.png(figure),
             out_dir / "sanity.json": (json.dumps(result.to_json(), indent=1) + "\n").encode()}
    for file, data in files.items():
        atomic_write(file, data)
    return result, list(files)
