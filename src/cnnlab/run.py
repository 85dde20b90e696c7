"""Loading a run folder or a checkpoint back into a model, its classes and its preprocessing.

Everything after training (evaluate, visualize, predict, report, export) starts here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cnnlab.errors import UserError
from cnnlab.models import build
from cnnlab.train import checkpoint


@dataclass
class LoadedRun:
    model: nn.Module  # in eval mode
    spec: dict[str, Any]  # name, num_classes, width, image_size, in_channels
    classes: list[str]
    mean: list[float]
    std: list[float]
    config: dict[str, Any]
    path: Path  # the checkpoint file
    run_dir: Path | None  # the run folder, when the checkpoint sits in one
    state: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def tta(self) -> bool:
        """Whether the run scored with test-time flip augmentation: what evaluate, predict and report
        do by default, so that they find the numbers the run reported."""
        return bool(self.config.get("tta", False))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or a run folder's best.pt (else last.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise UserError(f"{path} holds no checkpoint (looked for checkpoints/best.pt and checkpoints/last.pt); "
                        "train into it first with: cnnlab train --out " + str(path))
    if not path.exists():
        raise UserError(f"{path} does not exist; give a run folder or a .pt checkpoint")
    return path


def load(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    ckpt_path = find_checkpoint(path)
    state = checkpoint.load(ckpt_path)
    spec = state["model_spec"]
    model = build(spec["name"], num_classes=spec["num_classes"], width=spec["width"],
                  in_channels=spec.get("in_channels", 3))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"{ckpt_path} does not match model {spec['name']} "
                        f"(width {spec['width']}, {spec['num_classes']} classes): {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else None
    return LoadedRun(model, dict(spec), list(state["classes"]), list(state["normalize"]["mean"]),
                     list(state["normalize"]["std"]), dict(state.get("config", {})), ckpt_path, run_dir, state)


def check_classes(loaded: LoadedRun, classes: list[str], dataset: str) -> None:
    """A model can only be scored on data whose classes are the ones it was trained on."""
    if list(classes) != loaded.classes:
        raise UserError(f"dataset {dataset} has classes {_names(classes)} but the model was trained on "
                        f"{_names(loaded.classes)}; evaluate it on a dataset with the same classes")


def _names(classes: list[str], most: int = 12) -> str:
    shown = ", ".join(classes[:most])
    return shown + (f" … ({len(classes)} in all)" if len(classes) > most else "")


def new_run_dir(prefix: str, parent: str | Path = "runs") -> Path:
    """``runs/PREFIX-YYYYmmdd-HHMMSS``, with a counter added when two runs start in the same second."""
    stem = Path(parent) / f"{prefix}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path
