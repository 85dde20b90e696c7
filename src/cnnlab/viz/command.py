"""``visualize(method, path, …)``: load a run, pick the images, run one method, write its figures.

This is what ``cnnlab visualize`` calls; each method's figures come from :mod:`cnnlab.viz.figures`.
"""

from __future__ import annotations

import io
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
from cnnlab.viz.figures import FIGURES
from cnnlab.viz.inputs import parse_target
from cnnlab.viz.job import Job
from cnnlab.viz.layers import layer_path

__all__ = ["visualize"]


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
    if method not in FIGURES:
        raise UserError(f"unknown method {method!r}; choose one of: {', '.join(FIGURES)}")
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
