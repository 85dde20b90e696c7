"""``visualize(method, path, …)``: load a run, pick the images, run one method, write its figures.

This is what ``cnnlab visualize`` calls; each method's figure lives in :mod:`cnnlab.viz.figures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnlab.core.errors import UserError
from cnnlab.run import LoadedRun
from cnnlab.viz.inputs import Batch, from_files, from_test_set, parse_target

__all__ = ["Job", "visualize"]


@dataclass
class Job:
    """Everything a figure needs: the loaded run, the images and the user's choices."""

    method: str
    run: LoadedRun
    out_dir: Path
    layers: list[str]
    targets: list[int]  # empty: each image's predicted class
    channels: list[int]
    kinds: list[str]
    count: int | None
    steps: int | None
    data_dir: str | None
    images: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    _test: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.run.model

    @property
    def device(self) -> torch.device:
        return next(self.run.model.parameters()).device

    @property
    def size(self) -> int:
        return self.run.preprocess.size

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 test images and labels the run reported on (loaded once)."""
        return self.run.test_set(data_dir=self.data_dir)

    def batch(self, default_count: int = 1) -> Batch:
        """The images asked for: ``--image`` files, else ``--index`` test images, else the first ``--count``."""
        pre = self.run.preprocess
        if self.images:
            batch = from_files(self.images, pre)
        else:
            indices = self.indices or list(range(self.count or default_count))
            x, y = self.test_set()
            batch = from_test_set(x, y, indices, pre)
        batch.x = batch.x.to(self.device)
        return batch

    def target(self) -> int | None:
        return self.targets[0] if self.targets else None

    def tag(self, batch: Batch) -> str:
        return batch.names[0] if len(batch.names) == 1 else f"{batch.names[0]}+{len(batch.names) - 1}"


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
    TensorBoard as images tagged ``viz/<method>/<name>``.
    """
    from cnnlab import run as runs
    from cnnlab.core.device import pick_device
    from cnnlab.viz.figures import FIGURES
    from cnnlab.viz.layers import layer_path
    from cnnlab.viz.render import to_tensorboard

    if method not in FIGURES:
        raise UserError(f"unknown method {method!r}; choose one of: {', '.join(FIGURES)}")
    if image is not None and index is not None:
        raise UserError("give either --image or --index, not both")
    for name, value in (("--count", count), ("--steps", steps)):
        if value is not None and value < (0 if name == "--steps" else 1):
            raise UserError(f"{name} must be at least {0 if name == '--steps' else 1} (got {value})")
    loaded = runs.load(path, device=pick_device(device))
    for name in _listed(layer):
        layer_path(loaded.model, name)  # an unknown layer fails before any work is done
    out_dir = Path(out) if out else (loaded.run_dir or loaded.path.parent) / "viz" / method
    job = Job(method, loaded, out_dir, [str(n) for n in _listed(layer)],
              [t for t in (parse_target(v, loaded.classes) for v in _listed(target)) if t is not None],
              [int(c) for c in _listed(channel)], [str(k) for k in _listed(kind)], count, steps, data_dir,
              [str(p) for p in _listed(image)], [int(i) for i in _listed(index)])
    pngs = FIGURES[method](job)
    if tensorboard:
        log_dir = (loaded.run_dir / "tb") if loaded.run_dir else out_dir / "tb"
        to_tensorboard(log_dir, pngs, f"viz/{method}")
    return pngs
