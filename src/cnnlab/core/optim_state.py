"""The optimizer's and the learning-rate schedule's state in a checkpoint, checked before torch takes them.

torch's ``load_state_dict`` takes whatever values a file holds: a learning rate of ``'abc'`` fails with a
traceback at the next step, and one of -1 trains by gradient ascent without a word. :func:`check` holds
the state a cnnlab run saves (SGD's parameter groups; a constant, cosine or one-cycle schedule) to what
such a run can contain, and raises ``ValueError`` naming the first field that is not.

What it cannot see from the file alone (how many groups and parameters the run's model has, the shapes
of the momentum buffers) is checked by the trainer against the model before it resumes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Numbers of an SGD parameter group, each finite and ≥ 0 (the rates the schedules start, peak and end at;
# the rate of the moment, ``lr``, is checked with the schedule).
GROUP_NUMBERS = ("initial_lr", "max_lr", "min_lr", "momentum", "dampening", "weight_decay",
                 "max_momentum", "base_momentum")
BELOW_ONE = ("momentum", "max_momentum", "base_momentum")  # a momentum of 1 or more never forgets
FLAGS = ("nesterov", "maximize", "differentiable")
OPTIONAL_FLAGS = ("foreach", "fused")  # None: torch chooses
# The group entries one-cycle phases may interpolate between (OneCycleLR reads group[name]).
PHASE_RATES = ("initial_lr", "max_lr", "min_lr")
PHASE_MOMENTA = ("max_momentum", "base_momentum")
ANNEALING = ("cos", "linear")
# Whole numbers of the schedulers, with the lowest value each may take.
SCHEDULER_WHOLE = {"last_epoch": -1, "_step_count": 0, "T_max": 1, "total_steps": 1}
SCHEDULER_RATES = ("base_lrs", "_last_lr")  # one per parameter group


def check(optimizer: Any, scheduler: Any, step: int) -> None:
    """Raise ``ValueError`` naming the field (``optimizer.param_groups[0].lr``) that a saved SGD optimizer
    and learning-rate schedule, ``step`` steps into a run, could not hold; return quietly when all fit."""
    groups = _groups(optimizer)
    _buffers(optimizer, groups)
    ended = _scheduler(scheduler, groups, step)
    for i, group in enumerate(groups):
        at = f"optimizer.param_groups[{i}].lr"
        # Past its last step one-cycle extrapolates (below 0): that rate is never used, as a finished run
        # is not resumed.
        _number(group["lr"], at, -math.inf if ended else 0.0)
        # A rate of 0 trains nothing: only a group that starts at 0 (--backbone-lr-scale 0), or a cosine
        # schedule that has reached its end, may hold it.
        if group.get("initial_lr", 0) > 0 and group["lr"] == 0 and not ended:
            raise ValueError(f"{at} is 0.0 in the middle of its schedule (it started at "
                             f"{group['initial_lr']:g}), where it is above 0")


def _number(value: Any, where: str, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        bound = f" ≥ {low:g}" if low > -math.inf else ""
        raise ValueError(f"{where} is {_shown(value)}, not a finite number{bound}")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def _groups(optimizer: Any) -> list[dict[str, Any]]:
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list) \
            or not isinstance(optimizer.get("state"), dict):
        raise ValueError("optimizer is not an optimizer's state (a table of param_groups and state)")
    groups, seen = optimizer["param_groups"], set()
    for i, group in enumerate(groups):
        at = f"optimizer.param_groups[{i}]"
        if not isinstance(group, dict):
            raise ValueError(f"{at} is {type(group).__name__}, not a table of values")
        params = group.get("params")
        if not isinstance(params, list) or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0
                                                   for p in params):
            raise ValueError(f"{at}.params is {_shown(params)}, not a list of parameter numbers")
        if seen.intersection(params) or len(set(params)) != len(params):
            raise ValueError(f"{at}.params names a parameter twice")
        seen.update(params)
        if "lr" not in group:
            raise ValueError(f"{at} has no lr")
        for key in GROUP_NUMBERS:
            if key in group:
                _number(group[key], f"{at}.{key}")
        for key in BELOW_ONE:
            if key in group and group[key] >= 1:
                raise ValueError(f"{at}.{key} is {group[key]!r}; a momentum must be below 1")
        if group.get("dampening", 0) > 1:
            raise ValueError(f"{at}.dampening is {group['dampening']!r}, above 1")
        for key in FLAGS + OPTIONAL_FLAGS:
            if key in group and not isinstance(group[key], bool) and not (key in OPTIONAL_FLAGS and group[key] is None):
                raise ValueError(f"{at}.{key} is {_shown(group[key])}, not True or False")
        if group.get("maximize"):
            raise ValueError(f"{at}.maximize is True: a run minimises its loss, and this would climb it")
    return groups


def _buffers(optimizer: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    """Each parameter's state (SGD: its momentum buffer) belongs to a parameter and is dense and finite."""
    known = {p for group in groups for p in group["params"]}
    for index, entry in optimizer["state"].items():
        at = f"optimizer.state[{index!r}]"
        if index not in known or not isinstance(entry, dict):
            raise ValueError(f"{at} is not the state of one of the optimizer's parameters")
        for key, value in entry.items():
            if value is None or not isinstance(value, torch.Tensor):
                continue
            if value.layout != torch.strided:
                raise ValueError(f"{at}.{key} is not a dense tensor")
            if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{at}.{key} holds NaN or infinity")


def _scheduler(scheduler: Any, groups: list[dict[str, Any]], step: int) -> bool:
    """Check a scheduler's state; return whether its schedule has reached its last step."""
    if not isinstance(scheduler, dict) or "last_epoch" not in scheduler:
        raise ValueError("scheduler is not a learning-rate schedule's state (it has no last_epoch)")
    for key in SCHEDULER_WHOLE.keys() & scheduler.keys():
        value, low = scheduler[key], SCHEDULER_WHOLE[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"scheduler.{key} is {_shown(value)}, not a whole number ≥ {low}")
    # The schedule steps once with every optimizer step, from 0 when it is made.
    if scheduler["last_epoch"] != step:
        raise ValueError(f"scheduler.last_epoch is {scheduler['last_epoch']}, but the checkpoint is at step {step}")
    ended = scheduler["last_epoch"] >= scheduler.get("T_max", scheduler.get("total_steps", math.inf))
    for key, value in scheduler.items():
        at = f"scheduler.{key}"
        if key in SCHEDULER_RATES:
            if not isinstance(value, list) or len(value) != len(groups):
                raise ValueError(f"{at} is {_shown(value)}, not one rate for each of the {len(groups)} "
                                 "parameter group(s)")
            for i, rate in enumerate(value):
                _number(rate, f"{at}[{i}]", -math.inf if ended and key == "_last_lr" else 0.0)
        elif key == "_schedule_phases":
            _phases(value, groups)
        elif key == "_anneal_func_type" and value not in ANNEALING:
            raise ValueError(f"{at} is {_shown(value)}, not one of: {', '.join(ANNEALING)}")
        elif key not in SCHEDULER_WHOLE and isinstance(value, (int, float)) and not isinstance(value, bool):
            _number(value, at)  # eta_min …
    return ended


def _phases(phases: Any, groups: list[dict[str, Any]]) -> None:
    """One-cycle phases: where each ends, and which group entries its rate and momentum run between."""
    if not isinstance(phases, list) or not phases:
        raise ValueError(f"scheduler._schedule_phases is {_shown(phases)}, not a list of phases")
    for i, phase in enumerate(phases):
        at = f"scheduler._schedule_phases[{i}]"
        if not isinstance(phase, dict):
            raise ValueError(f"{at} is {type(phase).__name__}, not a table of values")
        _number(phase.get("end_step"), f"{at}.end_step")
        for key, names in (("start_lr", PHASE_RATES), ("end_lr", PHASE_RATES),
                           ("start_momentum", PHASE_MOMENTA), ("end_momentum", PHASE_MOMENTA)):
            name = phase.get(key)
            if name not in names:
                raise ValueError(f"{at}.{key} is {_shown(name)}, not one of: {', '.join(names)}")
            if key.endswith("_lr") and not all(name in group for group in groups):
                raise ValueError(f"{at}.{key} is {name!r}, which the optimizer's parameter groups do not hold")
