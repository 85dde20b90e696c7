"""An exponential moving average (EMA) of a model's weights, scored and saved in place of the weights.

Averaging the weights of the last few hundred steps smooths out the noise of SGD's final steps
(Polyak & Juditsky, 1992); short, high-learning-rate schedules such as the ``fast`` recipe gain most.
``torch.optim.swa_utils.AveragedModel`` averages with a fixed decay, which in a run of a few thousand
steps leaves the random initial weights in the average for too long; here the decay warms up as in
TensorFlow's ``ExponentialMovingAverage(num_updates=step)``: min(decay, (1 + step) / (10 + step)).
The update is one fused (foreach) op over all floating-point tensors per step.

:class:`Lookahead` is airbench's weight average (Jordan 2024), built on the same average: every few steps
the average moves toward the weights and the weights are set back to it, as the Lookahead optimizer does
(Zhang et al. 2019), with a rate that decays over the run so that the end of training averages strongly.
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

    def end_epoch(self, step: int) -> None:
        """Called at the end of each epoch; the moving average leaves the weights as they are."""


class Lookahead(WeightAverage):
    """airbench's Lookahead-style average: from step ``start`` on, at every ``every``-th step the average is
    blended toward the weights, ``avg ← decay·avg + (1 − decay)·weights`` with ``decay = base^every ·
    (step / total)^power``, and the weights are set to the average; before ``start`` it follows the weights
    (the first blend only takes them), and at each epoch's end the weights are set to it again
    (:meth:`end_epoch`). The weights and the average are thus equal at every epoch's end.

    ``module`` holds the average, as for :class:`WeightAverage`; both are in a checkpoint, so a run
    resumes exactly at any step.
    """

    BASE, POWER = 0.95, 3.0  # airbench94's decay_base and decay_pow

    def __init__(self, model: nn.Module, every: int, start: int, total: int) -> None:
        super().__init__(model, self.BASE)
        if every < 1 or total < 1:
            raise ValueError(f"Lookahead needs every ≥ 1 and total ≥ 1 steps, got {every} and {total}")
        self.every, self.total = every, total
        self.first = -(-max(start, 1) // every) * every  # the first blend: the first multiple of every ≥ start

    def decay_at(self, step: int) -> float:
        return self.BASE ** self.every * (step / self.total) ** self.POWER

    def started(self, step: int) -> bool:
        """Whether the first blend has happened by the end of step ``step``."""
        return step >= self.first

    @torch.no_grad()
    def update(self, step: int) -> None:
        if not self.started(step) or step == self.first:  # following the weights, or taking them
            torch._foreach_copy_(self._averaged, self._current)
        elif step % self.every == 0:
            torch._foreach_lerp_(self._averaged, self._current, 1 - self.decay_at(step))
            torch._foreach_copy_(self._current, self._averaged)
        else:
            return
        for a, b in self._copied:
            a.copy_(b)

    @torch.no_grad()
    def end_epoch(self, step: int) -> None:
        """At the end of an epoch (after step ``step``): the weights go back to the average once it has started."""
        if self.started(step):
            torch._foreach_copy_(self._current, self._averaged)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach() for t in (*model.parameters(), *model.buffers())]
