"""Class models shown to an independently trained run: more than noise that fools one network?

Activation maximisation can find adversarial noise: pixels that only the network they were optimised
on takes for the class. A run trained independently (another seed, width or architecture) on the same
classes and image size has no reason to be fooled by that noise, so the probability it gives each
class model's class, and whether that class is its top-1, say how much of the class the picture holds.
The class models are scored as a saved image holds them (rounded to 8 bits), so that anyone can check
the numbers with the PNGs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from cnnlab import run as runs
from cnnlab.core.errors import UserError
from cnnlab.inspect.results import Transfer

__all__ = ["check_run", "transfer"]


def check_run(run: runs.LoadedRun, path: str | Path) -> runs.LoadedRun:
    """The run at ``path``, opened on ``run``'s device, once checked that it can judge ``run``'s class
    models: another run, on images of the same size and channels, with the same classes."""
    other = runs.load(path, device=run.device)
    if other.path.resolve() == run.path.resolve():
        raise UserError(f"`check_with` {path} is the run whose class models it would check; give a run trained "
                        "independently (another seed, width or architecture)")
    mine, theirs = run.preprocess, other.preprocess
    if (theirs.size, theirs.channels) != (mine.size, mine.channels):
        raise UserError(f"`check_with` {path} takes {theirs.size}-px images with {theirs.channels} channel(s), the "
                        f"class models are {mine.size} px with {mine.channels}; give a run trained at the same size")
    if other.classes != run.classes:
        raise UserError(f"`check_with` {path} was trained on the classes {runs.names_of(other.classes)}, this run on "
                        f"{runs.names_of(run.classes)}; give a run trained on the same classes")
    return other


def transfer(other: runs.LoadedRun, pixels: Tensor, classes: Sequence[int]) -> Transfer:
    """How run ``other`` takes the class models ``pixels`` (K, C, H, W) in [0, 1] of ``classes``: its
    probability of each one's class (a plain softmax, as the class models' own) and its top-1 class."""
    saved = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)  # as a PNG holds them
    with torch.no_grad():
        probs = other.model(other.preprocess.to_input(saved.to(other.device))).float().softmax(1).cpu()
    chosen = torch.tensor(list(classes))
    return Transfer(str(other.path), list(classes), probs[torch.arange(len(chosen)), chosen], probs.argmax(1))
