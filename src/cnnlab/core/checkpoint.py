"""Checkpoints: the schema (one writer, one reader), written atomically, read without ever unpickling code.

On disk a checkpoint is a dict of tensors and plain Python values, so ``torch.load(weights_only=True)``
reads it and refuses anything that would run code. :class:`Checkpoint` is its typed form: :func:`write`
is the only writer and :func:`read` the only reader; ``read`` also takes the checkpoints of earlier
schema versions. ``save`` and ``load`` are the raw, safe I/O beneath them.

Schema 2 (current): ``schema``, ``model`` (the weights that are scored), ``train_model`` (the raw
weights, only with a weight average), ``model_spec`` (:class:`ModelSpec`), ``preprocess``
(:class:`Preprocess`), ``classes``, ``config``, ``versions``, and, while training, ``optimizer``,
``scheduler``, ``epoch``, ``step``, ``best_val_acc``, ``partial_epoch``, ``rng``.
Two optional keys were added without a new schema number (earlier readers ignore them, and files
without them still load): ``checksum``, the sha256 of every tensor in the file (:func:`tensor_digest`),
verified on reading, so that a flipped bit is found instead of trained on; and ``data``, a description
of the training data (``{"hash": …}``) that ``--resume`` compares with the data it finds; and, while
training, ``best``: the watched validation figure's best so far (``{"metric", "value", "epoch", "stale"}``,
``stale`` the epochs since it improved), which early stopping resumes from (without it: from
``best_val_acc``, no epochs stale).
Schema 1 (no ``schema`` key): the image size inside ``model_spec``, ``normalize`` = {mean, std}.

:func:`read` checks every field against the bounds of :mod:`cnnlab.core.spec` (the optimizer's and the
schedule's state against :mod:`cnnlab.core.optim_state`) before anything is built from it, and refuses
weights that are not finite: every way a file can be wrong is one ``UserError``.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnlab.core import optim_state
from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write
from cnnlab.core.spec import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, ModelSpec, Preprocess

SCHEMA = 2
TRAINING_KEYS = ("optimizer", "scheduler", "epoch", "step", "best_val_acc", "partial_epoch", "rng")
BEST_METRICS = ("val_acc", "val_loss")  # what ``best`` may watch (TrainConfig.early_stop_metric)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
PICKLE_MAGIC = b"\x80"  # a bare pickle (protocol 2 and later) starts with PROTO
# torch.save(_use_new_zipfile_serialization=False): a pickle that starts with torch's magic number
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]  # the weights that are scored and reported
    spec: ModelSpec
    preprocess: Preprocess
    classes: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    train_model: dict[str, torch.Tensor] | None = None  # the raw weights when ``model`` is their average
    training: dict[str, Any] | None = None  # TRAINING_KEYS (and ``best`` when known): what resuming needs
    data: dict[str, Any] = field(default_factory=dict)  # {"hash": content hash of the dataset}, when known

    @property
    def step(self) -> int | None:
        return None if self.training is None else int(self.training["step"])


def write(ckpt: Checkpoint, path: Path) -> None:
    """The one writer of checkpoints (atomic, see :func:`save`), with the checksum of its tensors."""
    state: dict[str, Any] = {
        "schema": SCHEMA, "model": ckpt.model, "model_spec": ckpt.spec.to_dict(),
        "preprocess": ckpt.preprocess.to_dict(), "classes": list(ckpt.classes), "config": ckpt.config,
        "versions": ckpt.versions,
    }
    if ckpt.train_model is not None:
        state["train_model"] = ckpt.train_model
    if ckpt.training is not None:
        state.update({k: ckpt.training[k] for k in TRAINING_KEYS})
        if ckpt.training.get("best") is not None:
            state["best"] = dict(ckpt.training["best"])
    if ckpt.data:
        state["data"] = dict(ckpt.data)
    state["checksum"] = tensor_digest(state)
    save(state, path)


def read(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """The one reader of checkpoints, any schema version; every way a file can be wrong is one UserError.

    Checked before anything is built from it: the checksum (when the file has one), every field's type
    and bounds, and that the weights are finite.
    """
    state = load(path, map_location)
    schema = state.get("schema", 1)
    if isinstance(schema, bool) or schema not in (1, SCHEMA):
        if isinstance(schema, int) and not isinstance(schema, bool) and schema > SCHEMA:
            raise UserError(f"{path} has checkpoint schema {schema!r}, newer than this cnnlab reads ({SCHEMA}); "
                            "upgrade cnnlab to read it")
        raise UserError(f"{path} is not a cnnlab checkpoint (its schema is {schema!r})")
    required = ("model", "model_spec", "classes") + (("normalize",) if schema == 1 else ("preprocess",))
    missing = [k for k in required if k not in state]
    if missing:
        raise UserError(f"{path} is not a cnnlab checkpoint (missing: {', '.join(missing)})")
    verify_checksum(state, path)
    try:
        spec, preprocess, classes = _describe(state, schema)
        model = _weights(state["model"], "model")
        train_model = None if state.get("train_model") is None else _weights(state["train_model"], "train_model")
        training = _training(state) if all(k in state for k in TRAINING_KEYS) else None
        config, versions, data = (_table(state.get(k, {}), k) for k in ("config", "versions", "data"))
    except ValueError as e:
        raise UserError(f"{path} is not a valid cnnlab checkpoint: {e}") from None
    if len(classes) != spec.num_classes:
        raise UserError(f"{path} does not match model {spec.name} ({spec.num_classes} classes in its model_spec, "
                        f"but {len(classes)} class names); the file is damaged or was edited")
    for key, weights in (("model", model), ("train_model", train_model)):
        bad = non_finite(weights or {})
        if bad:
            raise UserError(f"{path} holds non-finite weights (NaN or infinity in {key} {bad}): it was saved "
                            "by a run that diverged; use an earlier checkpoint, or train again with a lower `lr`")
    return Checkpoint(model, spec, preprocess, classes, config, versions, train_model, training, data)


def _describe(state: dict[str, Any], schema: int) -> tuple[ModelSpec, Preprocess, list[str]]:
    """The model description, preprocessing and class names, checked (``ValueError`` says what is wrong)."""
    spec = ModelSpec.from_dict(state["model_spec"])
    if schema == 1:
        normalize = state["normalize"]
        if not isinstance(normalize, dict):
            raise ValueError("normalize is not a table of values")
        size = state["model_spec"].get("image_size")
        preprocess = Preprocess.from_dict({"size": size, "channels": spec.in_channels, "mean": normalize.get("mean"),
                                           "std": normalize.get("std")}, where="normalize")
    else:
        preprocess = Preprocess.from_dict(state["preprocess"])
    if preprocess.channels != spec.in_channels:
        raise ValueError(f"preprocess has {preprocess.channels} channel(s) but the model takes {spec.in_channels}")
    if not MIN_IMAGE_SIZE <= preprocess.size <= MAX_IMAGE_SIZE:  # pragma: no cover - from_dict checks it
        raise ValueError(f"image size {preprocess.size} is out of bounds")
    classes = state["classes"]
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise ValueError("classes is not a list of names")
    if len(set(classes)) != len(classes):
        raise ValueError("classes names a class twice")
    return spec, preprocess, list(classes)


def _weights(value: Any, key: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{key} is {type(value).__name__}, not a table of named tensors")
    for name, tensor in value.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ValueError(f"{key} holds {name!r}, which is not a named dense tensor")
    return value


def _training(state: dict[str, Any]) -> dict[str, Any]:
    t = {k: state[k] for k in TRAINING_KEYS}
    for key in ("epoch", "step"):
        if isinstance(t[key], bool) or not isinstance(t[key], int) or t[key] < 0:
            raise ValueError(f"{key} is {t[key]!r}, not a whole number ≥ 0")
    best = t["best_val_acc"]
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float)) or not math.isfinite(best)):
        raise ValueError(f"best_val_acc is {best!r}, not a number")
    partial = t["partial_epoch"]
    names = {"loss_sum", "correct", "seen", "seconds"}
    if not isinstance(partial, dict) or set(partial) != names or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in partial.values()):
        raise ValueError(f"partial_epoch is not a table of the numbers {', '.join(sorted(names))}")
    rng = t["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        raise ValueError("rng holds no torch generator state")
    optim_state.check(t["optimizer"], t["scheduler"], t["step"])
    if "best" in state:
        t["best"] = _best(state["best"])
    return t


def _best(best: Any) -> dict[str, Any]:
    """The saved best-so-far of the watched validation figure, checked field by field."""
    names = {"metric", "value", "epoch", "stale"}
    if not isinstance(best, dict) or set(best) != names:
        raise ValueError(f"best is not a table of {', '.join(sorted(names))}")
    if best["metric"] not in BEST_METRICS:
        raise ValueError(f"best watches {best['metric']!r}, not one of {', '.join(BEST_METRICS)}")
    value = best["value"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
        raise ValueError(f"best value is {value!r}, not a finite number")
    for key in ("epoch", "stale"):
        if isinstance(best[key], bool) or not isinstance(best[key], int) or best[key] < 0:
            raise ValueError(f"best {key} is {best[key]!r}, not a whole number ≥ 0")
    return dict(best)


def _table(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{key} is {type(value).__name__}, not a table of named values")
    return dict(value)


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or an infinity, else None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def tensor_digest(state: Any) -> str:
    """sha256 over every tensor in ``state``: its place (dict keys, list positions), dtype, shape and bytes.

    Tensors are visited in a fixed order (dict keys sorted), so the same tensors give the same digest
    however they were built; plain values around them do not count (they are checked field by field).
    """
    digest = hashlib.sha256(b"cnnlab-tensors-1\0")
    for where, tensor in sorted(_tensors(state, ""), key=lambda item: item[0]):
        t = tensor.detach()
        digest.update(f"{where}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            digest.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def _tensors(value: Any, where: str):
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            if where == "" and key == "checksum":
                continue
            yield from _tensors(item, f"{where}/{key!r}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{where}[{i}]")


def verify_checksum(state: dict[str, Any], path: Path) -> None:
    """Refuse a file whose tensors are not the ones written (a flipped bit, a damaged copy)."""
    stored = state.get("checksum")
    if stored is None:
        return  # written before checksums were stored
    if not isinstance(stored, str) or tensor_digest(state) != stored:
        raise UserError(f"checkpoint {path} is corrupt: its tensors do not match the checksum stored when it was "
                        "written (a damaged disk or copy?); use another checkpoint, e.g. best.pt, or an intact copy")


def save(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that a crash at any moment leaves the old file or the new one."""
    def failed(why: str) -> UserError:
        kept = f"the previous {path.name} is intact" if path.exists() else "no earlier checkpoint was written"
        return UserError(f"cannot write checkpoint {path}: {why}; free some space or choose another `out` ({kept})")

    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:  # disk full, read-only or vanished folder, quota, file size limit …
        raise failed(e.strerror or str(e)) from None
    except RuntimeError as e:
        # torch's zip writer reports a failed write (file size limit, full disk) as a RuntimeError.
        text = str(e)
        if "unexpected pos" not in text and "failed writing" not in text and "file write failed" not in text:
            raise
        raise failed("the file could not be written in full (a file size limit, quota or full disk?)") from None


def torch_load(path: Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """What ``torch.save`` wrote to ``path`` (``what``: "checkpoint", "weights file"), read without running
    code; a bare pickle, damaged bytes or a refused object become one clear UserError."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(LEGACY_MAGIC))
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    if magic.startswith(PICKLE_MAGIC) and magic != LEGACY_MAGIC:
        raise UserError(f"refusing to load {path}: it is a bare Python pickle, not a file written by torch.save, "
                        "and unpickling it could run code; save the weights with torch.save instead")
    if not magic.startswith(ZIP_MAGIC) and magic != LEGACY_MAGIC:
        raise UserError(f"cannot read {what} {path}: the file is truncated or corrupt "
                        "(it is not a file written by torch.save)")
    try:
        with warnings.catch_warnings():  # torch's warnings about odd pickles would be a second line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch explains at length; the line naming the refused object is the one that matters.
        why = next((line.strip() for line in str(e).splitlines()
                    if "GLOBAL" in line or "Unsupported global" in line), None)
        if why is None:  # not a refused object but bytes that are no pickle at all
            raise UserError(f"cannot read {what} {path}: the file is truncated or corrupt") from None
        raise UserError(f"refusing to load {path}: it holds more than tensors and plain values, "
                        f"and loading it could run code ({why})") from None
    except MemoryError:
        raise UserError(f"cannot read {what} {path}: it does not fit in memory") from None
    except Exception as e:  # noqa: BLE001 - whatever damaged bytes make torch raise, the file is at fault
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {what} {path}: the file is truncated or corrupt ({first})") from None
    return state


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely; every way it can be wrong becomes one clear UserError."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    state = torch_load(path, "checkpoint", map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not a cnnlab checkpoint (it holds no model weights)")
    return state
