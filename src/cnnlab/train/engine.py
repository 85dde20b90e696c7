"""The training loop: data on the device, SGD, per-epoch evaluation, atomic checkpoints, exact resume.

Read it top to bottom: ``train`` sets a run up (or picks one up from its last checkpoint), then
``_fit`` runs the epochs. The order and augmentation of every batch depend only on (seed, epoch), and
everything else that changes while training is in the checkpoint, so a resumed run ends with the same
weights as one that was never stopped.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import cnnlab
from cnnlab.config import TrainConfig, validate
from cnnlab.data import load_dataset
from cnnlab.data.loader import TrainBatches
from cnnlab.data.splits import Splits, split
from cnnlab.errors import UserError
from cnnlab.evaluate import score
from cnnlab.models import build
from cnnlab.run import new_run_dir
from cnnlab.train import checkpoint, distributed
from cnnlab.train.device import amp_choice, compiled, keep_freed_memory, pick_device, use_amp, use_channels_last
from cnnlab.train.ema import WeightAverage
from cnnlab.train.lock import RunLock
from cnnlab.train.logging import RunLog

FLUSH_EVERY = 25  # steps between reading losses back from the device (each read waits for the GPU)


@dataclass
class Result:
    run_dir: Path
    last: dict[str, Any]  # the final epoch record ({} when stopped before an epoch ended)
    best_val_acc: float | None
    step: int = 0  # the step training stopped at


def train(cfg: TrainConfig | None = None, resume: str | Path | None = None, device: str | None = None,
          stop_after: int | None = None) -> Result:
    """Train from ``cfg`` into a new run folder, or continue the run in folder ``resume``.

    ``stop_after`` ends this call after that many steps with a checkpoint, for jobs with a time
    limit: the run goes on later with ``resume``. Started by torchrun, every rank calls this.
    """
    if stop_after is not None and stop_after < 1:
        raise UserError(f"--stop-after must be at least 1 step (got {stop_after})")
    group = distributed.setup(device or (cfg.device if cfg is not None else "auto"))
    try:
        return _train(group, cfg, resume, device, stop_after)
    except Exception as e:
        lost = distributed.describe_failure(e, group)
        if lost is None:
            raise
        raise UserError(lost) from None
    finally:
        distributed.teardown(group)


def _train(group: distributed.Group, cfg: TrainConfig | None, resume: str | Path | None, device: str | None,
           stop_after: int | None) -> Result:
    # Only rank 0 touches the run folder's lock, config, logs and checkpoints; all ranks read.
    only_main = RunLock if group.main else (lambda _: nullcontext())
    if resume is not None:
        run_dir = Path(resume)
        path = _resume_checkpoint(run_dir)
        with only_main(run_dir):  # before reading last.pt, so that no live run is rewriting it
            state = checkpoint.load(path)
            cfg = TrainConfig(**{k: tuple(v) if k in ("mean", "std") else v for k, v in state["config"].items()})
            if device is not None:
                cfg.device = device
            validate(cfg)
            dev, data, model, spec = _prepare(cfg, group)
            _check_same_run(state, spec, data)
            return _start(cfg, dev, data, model, spec, run_dir, state, group, stop_after)
    assert cfg is not None
    run_dir = Path(distributed.broadcast(str(_new_run_dir(cfg)) if group.main else None, group))
    _refuse_existing_run(run_dir)
    dev, data, model, spec = _prepare(cfg, group)
    if group.main:
        # Only once the data and model are ready, so that a failed start leaves no empty run folder behind.
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run folder {run_dir}: {e.strerror}") from None
    with only_main(run_dir):
        if group.main:
            _refuse_existing_run(run_dir)  # again: another process may have started here meanwhile
        return _start(cfg, dev, data, model, spec, run_dir, None, group, stop_after)


def _prepare(cfg: TrainConfig, group: distributed.Group) -> tuple[torch.device, Splits, nn.Module, dict[str, Any]]:
    """The device, the data splits and a freshly initialised model (seeded) for ``cfg``."""
    dev = distributed.device_for(group, pick_device(cfg.device))
    if dev.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.seed)
    dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                           skip_bad_images=cfg.skip_bad_images)
    if dataset.skipped and group.main:
        shown = ", ".join(dataset.skipped[:5]) + (" …" if len(dataset.skipped) > 5 else "")
        print(f"skipped {len(dataset.skipped)} unreadable image(s): {shown}", file=sys.stderr)
    data = split(dataset, cfg.limit_train, cfg.limit_test, cfg.val_split)
    in_channels = data.train_x.shape[1]
    model = build(cfg.model, num_classes=len(data.classes), width=cfg.width, in_channels=in_channels)
    spec = {"name": cfg.model, "num_classes": len(data.classes), "width": cfg.width,
            "image_size": cfg.image_size, "in_channels": in_channels}
    return dev, data, model, spec


def _start(cfg: TrainConfig, dev: torch.device, data: Splits, model: nn.Module, spec: dict[str, Any],
           run_dir: Path, state: dict[str, Any] | None, group: distributed.Group, stop_after: int | None) -> Result:
    if group.main:
        for stale in (run_dir / "checkpoints").glob(".*.tmp"):
            stale.unlink(missing_ok=True)  # half-written checkpoints of a process that was killed
        _write_config(run_dir, cfg, dev, data, group)
    try:
        return _fit(cfg, dev, data, model, spec, run_dir, state, group, stop_after)
    except torch.cuda.OutOfMemoryError:
        per_rank = -(-cfg.batch_size // group.world)
        raise UserError(f"the GPU ran out of memory with {per_rank} images per GPU at {cfg.image_size} px; "
                        f"try --batch-size {max(cfg.batch_size // 2, 1)}, a smaller --image-size or --amp") from None


def _fit(cfg: TrainConfig, dev: torch.device, data: Splits, model: nn.Module, spec: dict[str, Any],
         run_dir: Path, state: dict[str, Any] | None, group: distributed.Group, stop_after: int | None) -> Result:
    amp = use_amp(cfg.amp, dev)
    channels_last = use_channels_last(cfg.channels_last, dev)
    model.to(dev, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    batches = TrainBatches(data.train_x.to(dev), data.train_y.to(dev), cfg.batch_size, cfg.image_size,
                           cfg.mean, cfg.std, cfg.augment, cfg.seed, channels_last, group.rank, group.world)
    val = (data.val_x.to(dev), data.val_y.to(dev))
    test = (data.test_x.to(dev), data.test_y.to(dev))
    steps_per_epoch = len(batches)
    if batches.dropped and group.main:
        print(f"the last {batches.dropped} training image(s) of each epoch are left out: too few to split "
              f"over {group.world} ranks (choose a --batch-size that leaves a remainder of 0 or at least "
              f"{group.world})", file=sys.stderr)
    total_steps = cfg.epochs * steps_per_epoch
    # The average is of the plain model (before sync-BN conversion): it only ever runs in eval mode.
    ema = WeightAverage(model, cfg.ema) if cfg.ema else None
    # What is scored, logged and saved as "model": the average when there is one.
    reported = ema.module if ema is not None else model

    forward = distributed.wrap(model, group, dev, cfg.sync_bn)  # before the optimizer sees the parameters
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                fused=dev.type == "cuda" or None)
    scheduler = _scheduler(cfg, optimizer, total_steps)
    # Summed, then divided by the global batch: N ranks' averaged gradients equal one process's.
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="sum")
    forward = compiled(forward, cfg.compile, cfg.cuda_graphs, dev)
    graphs = cfg.cuda_graphs and dev.type == "cuda"
    # Evaluation runs each rank's shard through the plain model: no collectives inside, so shards
    # of different lengths cannot leave a rank waiting.
    evaluator = reported if group.active or ema is not None else forward
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if amp else nullcontext()

    step, best_val, partial = 0, None, {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    if state is not None:
        model.load_state_dict(state.get("train_model", state["model"]))
        if ema is not None:
            ema.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if dev.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step, best_val, partial = state["step"], state["best_val_acc"], dict(state["partial_epoch"])
    if step >= total_steps:
        raise UserError(f"the run in {run_dir} already finished all {cfg.epochs} epochs; nothing to resume")

    saved_step = step

    def save(name: str) -> None:
        nonlocal saved_step
        saved_step = step
        if not group.main:
            return
        checkpoint.save({
            "model": reported.state_dict(), **({"train_model": model.state_dict()} if ema is not None else {}),
            "model_spec": spec, "classes": data.classes,
            "normalize": {"mean": list(cfg.mean), "std": list(cfg.std)},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": step // steps_per_epoch, "step": step, "best_val_acc": best_val, "partial_epoch": partial,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if dev.type == "cuda" else []},
            "config": cfg.to_dict(), "versions": {"cnnlab": cnnlab.__version__, "torch": str(torch.__version__)},
        }, run_dir / "checkpoints" / name)

    log = RunLog(run_dir, total_steps, start_step=step, epochs=cfg.epochs) if group.main else None
    if step == 0:
        if log is not None:
            log.hyperparameters(cfg.to_dict())
        save("last.pt")  # so that even a run that fails in its first epoch can be resumed or inspected
    last: dict[str, Any] = {}
    stop_at = step + stop_after if stop_after else None
    stopping = False
    model.train()
    try:
        for epoch in range(step // steps_per_epoch, cfg.epochs):
            start = step - epoch * steps_per_epoch
            pending: list[tuple[torch.Tensor, torch.Tensor, int, float]] = []
            tick = time.perf_counter()
            for i, (x, y, n_global) in enumerate(batches.epoch(epoch, start), start=start):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done with
                with autocast:
                    logits = forward(x)
                    loss_sum = criterion(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                (loss_sum * (group.world / n_global)).backward()
                optimizer.step()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                if ema is not None:
                    ema.update(step)
                pending.append((loss_sum.detach(), (logits.argmax(1) == y).sum(), len(y), lr))
                last_of_epoch = i == steps_per_epoch - 1
                stopping = stop_at is not None and step >= stop_at
                mid_checkpoint = not last_of_epoch and (
                    stopping or cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                if len(pending) == FLUSH_EVERY or last_of_epoch or mid_checkpoint:
                    bad = _flush(log, epoch + 1, step, pending, partial, time.perf_counter() - tick, group)
                    if bad is not None:
                        raise UserError(
                            f"training diverged: the loss became {bad[1]} at step {bad[0]} (epoch {epoch + 1}); "
                            f"the learning rate ({bad[2]:g}) is most likely too high for this model and batch size, "
                            f"try a lower --lr; the last good checkpoint (step {saved_step}) is "
                            f"{run_dir / 'checkpoints' / 'last.pt'}")
                    pending, tick = [], time.perf_counter()
                if mid_checkpoint:
                    save("last.pt")
                if stopping and not last_of_epoch:
                    break
            if stopping and not last_of_epoch:
                break

            record = {"epoch": epoch + 1, "step": step, "lr": lr,  # the rate its last step used
                      "train_loss": partial["loss_sum"] / max(partial["seen"], 1),
                      "train_acc": partial["correct"] / max(partial["seen"], 1),
                      "seconds": partial["seconds"], "images_per_s": partial["seen"] / max(partial["seconds"], 1e-9)}
            scored = {"val": val, "test": test} if len(val[1]) else {"test": test}
            for name, (vx, vy) in scored.items():
                vx, vy = distributed.shard(vx, group), distributed.shard(vy, group)
                s = score(evaluator, vx, vy, image_size=cfg.image_size, mean=cfg.mean, std=cfg.std,
                          batch_size=max(cfg.batch_size, 256), amp=amp, channels_last=channels_last, tta=cfg.tta)
                totals = distributed.all_sum(torch.tensor(
                    [s.loss * len(vy), (s.predictions == s.labels).sum().item(), len(vy)], dtype=torch.float64,
                    device=dev), group).tolist()
                record[f"{name}_loss"], record[f"{name}_acc"] = totals[0] / max(totals[2], 1), totals[1] / max(totals[2], 1)
            if log is not None:
                log.filters(reported, step)
                log.predictions(vx, vy, s.predictions, data.classes, step)  # the (rank 0 shard of the) test set
                log.epoch(record)
            partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            improved = "val_acc" in record and (best_val is None or record["val_acc"] > best_val)
            if improved:
                best_val = record["val_acc"]
            save("last.pt")
            if improved:
                save("best.pt")
            last = record
            if stopping:
                break
    finally:
        if log is not None:
            log.close()
    return Result(run_dir, last, best_val, step)


def _flush(log: RunLog | None, epoch: int, step: int, pending: list, partial: dict[str, Any],
           seconds: float, group: distributed.Group) -> tuple[int, float, float] | None:
    """Read a window of per-step numbers back from the device in one go (summed over ranks) and log them.

    Returns (step, loss, lr) of the first step whose loss is not finite, after logging the steps before it.
    """
    device = pending[0][0].device
    sums = torch.stack([torch.stack([p[0] for p in pending]).double(), torch.stack([p[1] for p in pending]).double(),
                        torch.tensor([float(p[2]) for p in pending], dtype=torch.float64, device=device)])
    loss_sums, correct, sizes = distributed.all_sum(sums, group).tolist()
    losses = [l / n for l, n in zip(loss_sums, sizes)]
    first = step - len(pending) + 1
    bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
    if bad is not None:
        if bad:
            _log_steps(log, epoch, first, losses[:bad], correct[:bad], sizes[:bad], pending[:bad], partial,
                       seconds * bad / len(pending))
        return first + bad, losses[bad], pending[bad][3]
    _log_steps(log, epoch, first, losses, correct, sizes, pending, partial, seconds)
    return None


def _log_steps(log: RunLog | None, epoch: int, first: int, losses: list[float], correct: list[float],
               sizes: list[float], pending: list, partial: dict[str, Any], seconds: float) -> None:
    partial["loss_sum"] += sum(l * n for l, n in zip(losses, sizes))
    partial["correct"] += int(sum(correct))
    partial["seen"] += int(sum(sizes))
    partial["seconds"] += seconds
    if log is not None:
        log.steps(epoch, first, losses, [c / n for c, n in zip(correct, sizes)], [p[3] for p in pending],
                  sum(sizes) / max(seconds, 1e-9))


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Per-step learning-rate schedules; their state goes into every checkpoint."""
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=total_steps)
    if cfg.schedule == "onecycle" and total_steps >= 2:
        # Momentum is left as configured: --momentum should mean what it says. The warm-up is a
        # quarter of the run, but more than one step: OneCycleLR divides by its length.
        return sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps,
                                pct_start=max(0.25, 1.5 / total_steps), anneal_strategy="linear",
                                cycle_momentum=False)
    return sched.LambdaLR(optimizer, lambda _: 1.0)


def _new_run_dir(cfg: TrainConfig) -> Path:
    run_dir = new_run_dir(f"{cfg.recipe}-{cfg.model}") if cfg.out is None else Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; give a folder for the run")
    return run_dir


def _refuse_existing_run(run_dir: Path) -> None:
    if any((run_dir / "checkpoints" / name).exists() for name in ("last.pt", "best.pt")):
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                        "or choose another --out")


def _resume_checkpoint(run_dir: Path) -> Path:
    path = run_dir / "checkpoints" / "last.pt"
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such run folder")
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: it holds no checkpoints/last.pt to continue from; "
                        f"start a new run with --out {run_dir}")
    return path


def _check_same_run(state: dict[str, Any], spec: dict[str, Any], data: Splits) -> None:
    if state["model_spec"] != spec or list(state["classes"]) != data.classes:
        raise UserError("the checkpoint's model or classes differ from what its configuration now builds "
                        "(was the dataset changed?); start a new run instead of resuming")


def _write_config(run_dir: Path, cfg: TrainConfig, dev: torch.device, data: Splits, group: distributed.Group) -> None:
    info = {
        "config": cfg.to_dict(),
        "cnnlab": cnnlab.__version__, "torch": str(torch.__version__),
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "amp": amp_choice(cfg.amp, dev),
        "world_size": group.world, "global_batch": cfg.batch_size,
        "per_rank_batch": -(-cfg.batch_size // group.world),  # the global batch, split as evenly as possible
        "data": {"classes": data.classes, "train": len(data.train_y), "val": len(data.val_y),
                 "test": len(data.test_y), "stored_size": list(data.train_x.shape[1:]),
                 "skipped_images": data.skipped},
    }
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(run_dir / "config.json")
