"""Repeated seeds: one run per seed in a group folder, and the spread of their final figures.

A group folder holds ``group.json`` (the seeds, the shared configuration, each run's status) and one
ordinary run folder per seed, ``seed-S/``, which every other command takes as it takes any run. The
runs train one after the other; each is resumable on its own, and resuming the group continues the
unfinished ones. Started by torchrun, every rank loops over the seeds together and each seed is a
distributed run; rank 0 alone writes ``group.json``.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from cnnlab.config import TrainConfig, from_saved, validate
from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write
from cnnlab.core.significance import spread
from cnnlab.train import distributed, tracking
from cnnlab.train.engine import Result, new_run_dir, train
from cnnlab.train.logging import read_metrics

__all__ = ["FIGURES", "GroupResult", "is_group", "read_group", "summary", "train_group"]

GROUP_FILE = "group.json"
# The final figures a group summarises: the last epoch's, and the whole run's training time.
FIGURES = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "seconds")


@dataclasses.dataclass
class GroupResult:
    group_dir: Path
    results: dict[int, Result]  # the runs this call trained, by seed
    finished: bool  # every seed's run has finished all its epochs


def is_group(path: str | Path) -> bool:
    """Whether ``path`` is a group folder (one that ``train_group`` wrote)."""
    return (Path(path) / GROUP_FILE).is_file()


def member(group_dir: Path, seed: int) -> Path:
    return group_dir / f"seed-{seed}"


def read_group(group_dir: str | Path) -> dict[str, Any]:
    """``group.json`` of ``group_dir``, checked: {"seeds": [...], "config": {...}, "runs": {"S": {...}}}."""
    path = Path(group_dir) / GROUP_FILE
    try:
        info = json.loads(path.read_text())
        seeds = [int(s) for s in info["seeds"]]
        if not seeds or len(set(seeds)) != len(seeds) or not isinstance(info["config"], dict):
            raise ValueError("its seeds must be distinct and at least one")
    except FileNotFoundError:
        raise UserError(f"{group_dir} holds no {GROUP_FILE}, so it is not a group of seeds") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path}: {e}; it is damaged or was edited") from None
    return {"seeds": seeds, "config": info["config"], "runs": info.get("runs") or {}}


def _check_seeds(seeds: list[int]) -> list[int]:
    if not seeds:
        raise UserError("`seeds` needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"`seeds` names a seed twice ({' '.join(map(str, seeds))}); give each seed once")
    return [int(s) for s in seeds]


def train_group(cfg: TrainConfig | None = None, seeds: list[int] | None = None, resume: str | Path | None = None,
                device: str | None = None, stop_after: int | None = None) -> GroupResult:
    """Train one run of ``cfg`` per seed into the group folder ``cfg.out`` (default
    ``runs/RECIPE-MODEL-seeds-TIME``), or continue the group in folder ``resume``.

    Each run equals ``train`` of ``cfg`` with that ``seed`` and ``out`` GROUP/seed-S. ``stop_after``
    counts the steps of this call over all its runs, then stops with a checkpoint (resume the group later).
    """
    if stop_after is not None and stop_after < 1:
        raise UserError(f"`stop_after` must be at least 1 step (got {stop_after})")
    if resume is not None:
        group_dir = Path(resume)
        info = read_group(group_dir)
        try:
            cfg = from_saved(info["config"])
        except UserError as e:
            raise UserError(f"{group_dir / GROUP_FILE} holds an invalid training configuration: {e}") from None
        seeds = info["seeds"]
        if device is not None:
            cfg.device = device
    else:
        assert cfg is not None and seeds is not None
        seeds = _check_seeds(seeds)
        for s in seeds:
            validate(dataclasses.replace(cfg, seed=s))  # each seed within the range `seed` takes
    if cfg.mlflow:
        tracking.require(cfg.mlflow)
    # Joined once for every run of the group (each run's ``train`` finds it joined and leaves it be).
    group = distributed.setup(device or cfg.device)
    try:
        if resume is None:
            group_dir = _new_group_dir(cfg, group)
        return _train_seeds(group, group_dir, cfg, seeds, device, stop_after)
    finally:
        distributed.teardown(group)


def _train_seeds(group: distributed.Group, group_dir: Path, cfg: TrainConfig, seeds: list[int],
                 device: str | None, stop_after: int | None) -> GroupResult:
    main = group.main
    status = {str(s): _status(member(group_dir, s), cfg.epochs) for s in seeds}
    if main:
        _write(group_dir, seeds, cfg, status)
    results: dict[int, Result] = {}
    budget = stop_after
    with _tracker(group, group_dir, cfg, seeds, status) as parent:
        for s in seeds:
            if status[str(s)] == "finished":
                continue
            run_dir = member(group_dir, s)
            if status[str(s)] == "stopped":
                result = train(resume=run_dir, device=device, stop_after=budget)
            else:
                result = train(dataclasses.replace(cfg, seed=s, out=str(run_dir)), stop_after=budget, parent=parent)
            results[s] = result
            status[str(s)] = _status(run_dir, cfg.epochs)
            if main:
                _write(group_dir, seeds, cfg, status)
            if budget is not None:
                budget -= result.step - result.started
                if budget < 1 or status[str(s)] != "finished":
                    break
        finished = all(v == "finished" for v in status.values())
        if parent is not None and finished:
            figures = summary(group_dir)["summary"]
            parent.metrics({f"{k}_{stat}": f[stat] for k, f in figures.items() for stat in ("mean", "std")}, 0)
            parent.finish("finished")
    return GroupResult(group_dir, results, finished)


def _tracker(group: distributed.Group, group_dir: Path, cfg: TrainConfig, seeds: list[int],
             status: dict[str, str]) -> Any:
    """The group's parent MLflow run (rank 0, with `mlflow`, while a seed is left to train), continued when the
    group is resumed; else nothing. Its parameters are the shared configuration and the seeds; its metrics, once
    every seed finished, the mean and standard deviation of each final figure (at step 0)."""
    if not (cfg.mlflow and group.main) or all(v == "finished" for v in status.values()):
        return nullcontext()
    shared = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "out")}
    return tracking.Tracker.start(cfg.mlflow, group_dir, {**shared, "seeds": " ".join(map(str, seeds))},
                                  resume=tracking.read_record(group_dir) is not None)


def _new_group_dir(cfg: TrainConfig, group: distributed.Group) -> Path:
    """The group folder, chosen and checked by rank 0 and told to the other ranks (which must not check it
    themselves: rank 0 may have written ``group.json`` there by then)."""
    told: Path | UserError | None = None
    if group.main:
        try:
            told = _choose_group_dir(cfg)
        except UserError as e:
            told = e
    told = distributed.broadcast(told, group)  # type: ignore[assignment]
    if isinstance(told, UserError):
        raise told
    assert isinstance(told, Path)
    return told


def _choose_group_dir(cfg: TrainConfig) -> Path:
    group_dir = Path(cfg.out) if cfg.out is not None else new_run_dir(f"{cfg.recipe}-{cfg.model}-seeds")
    if group_dir.exists() and not group_dir.is_dir():
        raise UserError(f"`out` {group_dir} is a file; give a folder for the group of runs")
    if is_group(group_dir) or (group_dir / "checkpoints").exists():
        raise UserError(f"{group_dir} already holds a run or a group; continue it with `resume` {group_dir} "
                        "or choose another `out`")
    return group_dir


def _status(run_dir: Path, epochs: int) -> str:
    """``finished`` (all epochs logged, or ended by early stopping), ``stopped`` (a checkpoint to resume
    from) or ``pending``."""
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        return "pending"
    try:
        if json.loads((run_dir / "config.json").read_text()).get("stopped"):
            return "finished"  # it says why it ended: all its epochs, or early stopping
    except (OSError, ValueError, AttributeError):
        pass  # a run folder of an earlier cnnlab, or config.json lost: its metrics say
    try:
        _, logged, _ = read_metrics(run_dir)
    except UserError:
        return "stopped"
    return "finished" if logged[-1].get("epoch") == epochs else "stopped"


def _write(group_dir: Path, seeds: list[int], cfg: TrainConfig, status: dict[str, str]) -> None:
    shared = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "out")}
    runs = {str(s): {"folder": member(group_dir, s).name, "status": status[str(s)]} for s in seeds}
    try:
        group_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(group_dir / GROUP_FILE, json.dumps({"seeds": seeds, "config": {**shared, "out": str(group_dir)},
                                                          "runs": runs}, indent=2))
    except OSError as e:
        raise UserError(f"cannot write {group_dir / GROUP_FILE}: {e.strerror or e}") from None


def summary(group_dir: str | Path) -> dict[str, Any]:
    """Each seed's final figures (its last epoch; ``seconds`` summed over its epochs) and their
    :func:`spread` over the finished runs: {"group", "seeds", "runs": [...], "summary": {figure: spread}}."""
    group_dir = Path(group_dir)
    info = read_group(group_dir)
    epochs = int(info["config"].get("epochs", 0))
    runs = []
    for s in info["seeds"]:
        run_dir = member(group_dir, s)
        row: dict[str, Any] = {"seed": s, "path": str(run_dir), "status": _status(run_dir, epochs), "epochs": 0}
        if row["status"] != "pending":
            try:
                _, logged, _ = read_metrics(run_dir)
                last = logged[-1]
                row.update({k: last.get(k) for k in FIGURES}, epochs=last.get("epoch"),
                           seconds=sum(r.get("seconds", 0.0) for r in logged))
            except UserError:
                pass
        runs.append(row)
    done = [r for r in runs if r["status"] == "finished"]
    figures = {k: spread([r[k] for r in done if r.get(k) is not None]) for k in FIGURES}
    return {"group": str(group_dir), "seeds": info["seeds"], "runs": runs, "summary": figures}
