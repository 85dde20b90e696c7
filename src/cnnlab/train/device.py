"""Choosing the device, and the speed settings that only pay off on it."""

from __future__ import annotations

import torch

from cnnlab.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose one of: auto, cpu, cuda")
    return torch.device(name)


def on_by_default(setting: bool | None, device: torch.device) -> bool:
    """bf16 autocast and channels-last help tensor cores; on a CPU they cost more than they give."""
    return device.type == "cuda" if setting is None else setting
