"""Which device a command runs on."""

from __future__ import annotations

import torch

from cnnlab.core.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("`device` cuda was asked for but no CUDA GPU is visible; use `device` cpu or auto")
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}")
    return torch.device(name)
