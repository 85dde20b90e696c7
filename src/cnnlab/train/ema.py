"""An exponential moving average (EMA) of a model's weights, scored and saved in place of the weights.

Averaging the weights of the last few hundred steps smooths out the noise of SGD's final steps
(Polyak & Juditsky, 1992); short, high-learning-rate schedules such as the ``fast`` recipe gain most.
``torch.optim.swa_utils.AveragedModel`` averages with a fixed decay, which in a run of a few thousand
steps leaves the random initial weights in the average for too long; here the decay warms up as in
TensorFlow's ``ExponentialMovingAverage(num_updates=step)``: min(decay, (1 + step) / (10 + step)).
The update is one fused (foreach) op over all floating-point tensors per step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class WeightAverage:
    """``module`` holds the average of ``model``'s parameters and BatchNorm statistics."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        # The source tensors are captured once: optimizers, load_state_dict and sync-BN conversion
        # all keep these very objects, so the lists stay valid for the whole run.
        pairs = list(zip(_tensors(self.module), _tensors(model), strict=True))
        self._averaged = [a for a, _ in pairs if a.is_floating_point()]
        self._current = [b for a, b in pairs if a.is_floating_point()]
        self._copied = [(a, b) for a, b in pairs if not a.is_floating_point()]  # BN's batch counters

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the model's weights after optimizer step number ``step`` (1 for the first)."""
        torch._foreach_lerp_(self._averaged, self._current, 1 - self.decay_at(step))
        for a, b in self._copied:
            a.copy_(b)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach() for t in (*model.parameters(), *model.buffers())]
