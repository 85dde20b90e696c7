"""Checkpoints: written atomically, read without ever unpickling code.

A checkpoint is a dict of tensors and plain Python values (see design.md § Run folder), so
``torch.load(weights_only=True)`` reads it and refuses anything that would run code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from cnnlab.errors import UserError


def save(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that a crash at any moment leaves the old file or the new one.

    The bytes go to a temporary file in the same folder, are flushed to disk, and only then renamed
    over the target: a rename within one file system is atomic.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, read-only or vanished folder, quota …
            kept = f"the previous {path.name} is intact" if path.exists() else "no earlier checkpoint was written"
            raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}; free some space or "
                            f"choose another --out ({kept})") from None
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a folder be opened for this.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    missing = [k for k in ("model", "model_spec", "classes", "normalize") if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{path} is not a cnnlab checkpoint (missing: {', '.join(missing)})")
    return state
