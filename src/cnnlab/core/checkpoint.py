"""Checkpoints: the schema (one writer, one reader), written atomically, read without ever unpickling code.

On disk a checkpoint is a dict of tensors and plain Python values, so ``torch.load(weights_only=True)``
reads it and refuses anything that would run code. :class:`Checkpoint` is its typed form: :func:`write`
is the only writer and :func:`read` the only reader; ``read`` also takes the checkpoints of earlier
schema versions. ``save`` and ``load`` are the raw, safe I/O beneath them.

Schema 2 (current): ``schema``, ``model`` (the weights that are scored), ``train_model`` (the raw
weights, only with a weight average), ``model_spec`` (:class:`ModelSpec`), ``preprocess``
(:class:`Preprocess`), ``classes``, ``config``, ``versions``, and, while training, ``optimizer``,
``scheduler``, ``epoch``, ``step``, ``best_val_acc``, ``partial_epoch``, ``rng``.
Schema 1 (no ``schema`` key): the image size inside ``model_spec``, ``normalize`` = {mean, std}.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write
from cnnlab.core.spec import ModelSpec, Preprocess

SCHEMA = 2
TRAINING_KEYS = ("optimizer", "scheduler", "epoch", "step", "best_val_acc", "partial_epoch", "rng")


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]  # the weights that are scored and reported
    spec: ModelSpec
    preprocess: Preprocess
    classes: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    train_model: dict[str, torch.Tensor] | None = None  # the raw weights when ``model`` is their average
    training: dict[str, Any] | None = None  # TRAINING_KEYS: what resuming needs

    @property
    def step(self) -> int | None:
        return None if self.training is None else int(self.training["step"])


def write(ckpt: Checkpoint, path: Path) -> None:
    """The one writer of checkpoints (atomic, see :func:`save`)."""
    state: dict[str, Any] = {
        "schema": SCHEMA, "model": ckpt.model, "model_spec": ckpt.spec.to_dict(),
        "preprocess": ckpt.preprocess.to_dict(), "classes": list(ckpt.classes), "config": ckpt.config,
        "versions": ckpt.versions,
    }
    if ckpt.train_model is not None:
        state["train_model"] = ckpt.train_model
    if ckpt.training is not None:
        state.update({k: ckpt.training[k] for k in TRAINING_KEYS})
    save(state, path)


def read(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """The one reader of checkpoints, any schema version; every way a file can be wrong is one UserError."""
    state = load(path, map_location)
    schema = state.get("schema", 1)
    if schema not in (1, SCHEMA):
        raise UserError(f"{path} has checkpoint schema {schema!r}, newer than this cnnlab reads ({SCHEMA}); "
                        "upgrade cnnlab to read it")
    required = ("model", "model_spec", "classes") + (("normalize",) if schema == 1 else ("preprocess",))
    missing = [k for k in required if k not in state]
    if missing:
        raise UserError(f"{path} is not a cnnlab checkpoint (missing: {', '.join(missing)})")
    try:
        spec = ModelSpec.from_dict(state["model_spec"])
        if schema == 1:
            preprocess = Preprocess(int(state["model_spec"]["image_size"]), spec.in_channels,
                                    tuple(state["normalize"]["mean"]), tuple(state["normalize"]["std"]))
        else:
            preprocess = Preprocess.from_dict(state["preprocess"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is not a cnnlab checkpoint (its model description is incomplete: {e!r})") from None
    training = {k: state[k] for k in TRAINING_KEYS} if all(k in state for k in TRAINING_KEYS) else None
    return Checkpoint(state["model"], spec, preprocess, list(state["classes"]), dict(state.get("config", {})),
                      dict(state.get("versions", {})), state.get("train_model"), training)


def save(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that a crash at any moment leaves the old file or the new one."""
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:  # disk full, read-only or vanished folder, quota …
        kept = f"the previous {path.name} is intact" if path.exists() else "no earlier checkpoint was written"
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}; free some space or "
                        f"choose another --out ({kept})") from None


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely; every way it can be wrong becomes one clear UserError."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch explains at length; the line naming the refused object is the one that matters.
        why = next((l.strip() for l in str(e).splitlines() if "GLOBAL" in l or "Unsupported global" in l), None)
        if why is None:  # not a refused object but bytes that are no pickle at all
            raise UserError(f"cannot read checkpoint {path}: the file is truncated or corrupt") from None
        raise UserError(f"refusing to load {path}: it holds more than tensors and plain values, "
                        f"and loading it could run code ({why})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: the file is truncated or corrupt ({first})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not a cnnlab checkpoint (it holds no model weights)")
    return state
