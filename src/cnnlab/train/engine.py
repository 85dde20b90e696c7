"""The training loop: data on the device, SGD, per-epoch evaluation, atomic checkpoints, exact resume.

Read it top to bottom: ``train`` sets a run up (or picks one up from its last checkpoint), then
``_fit`` runs the epochs. The order and augmentation of every batch depend only on (seed, epoch), and
everything else that changes while training is in the checkpoint, so a resumed run ends with the same
weights as one that was never stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import cnnlab
from cnnlab.config import TrainConfig, from_saved, validate
from cnnlab.core import checkpoint
from cnnlab.core.device import pick_device
from cnnlab.core.errors import Interrupted, UserError
from cnnlab.core.files import atomic_write, remove_stale
from cnnlab.core.metrics import score
from cnnlab.core.spec import ModelSpec, Preprocess
from cnnlab.data import open_dataset
from cnnlab.data.loader import TrainBatches, place
from cnnlab.data.splits import Splits, split
from cnnlab.models import build, default_width, transfer
from cnnlab.models import weights as pretrained
from cnnlab.train import distributed, tracking
from cnnlab.train.device import amp_choice, compiled, keep_freed_memory, use_amp, use_channels_last
from cnnlab.train.ema import Lookahead, WeightAverage
from cnnlab.train.initialise import WHITEN_IMAGES, dirac_init, first_conv, whiten_first_conv
from cnnlab.train.lock import RunLock
from cnnlab.train.logging import RunLog, epoch_record

log = logging.getLogger(__name__)

FLUSH_EVERY = 25  # steps between reading losses back from the device (each read waits for the GPU)


@dataclass
class Result:
    run_dir: Path
    last: dict[str, Any]  # the final epoch record ({} when stopped before an epoch ended)
    best_val_acc: float | None
    step: int = 0  # the step training stopped at
    started: int = 0  # the step this call started from (0, or the resumed checkpoint's)
    stopped: str | None = None  # why the run ended ("finished", or the early stop's reason); None: it goes on
    best: dict[str, Any] = field(default_factory=dict)  # the epoch record of best.pt, when early stopping ended it


@dataclass
class Setup:
    """What a run trains: fixed once training starts."""

    cfg: TrainConfig
    device: torch.device
    data: Splits
    model: nn.Module
    spec: ModelSpec
    preprocess: Preprocess
    run_dir: Path
    group: distributed.Group
    weights: dict[str, Any] | None = None  # where the starting weights came from, for config.json
    frozen: int = 0  # parameter tensors --freeze froze


@dataclass
class EpochSums:
    """The running totals of the epoch in progress (saved in mid-epoch checkpoints as ``partial_epoch``)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    def record(self, epoch: int, step: int, lr: float) -> dict[str, Any]:
        """The epoch's line of metrics.jsonl, before evaluation adds to it."""
        seen = max(self.seen, 1)
        return {"epoch": epoch, "step": step, "lr": lr, "train_loss": self.loss_sum / seen,
                "train_acc": self.correct / seen, "seconds": self.seconds,
                "images_per_s": self.seen / max(self.seconds, 1e-9)}


@dataclass
class StepStats:
    """One step's numbers, kept on the device until a window of them is read back at once."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    size: int
    lr: float
    finite: torch.Tensor  # whether every weight was still finite after this step's update


@dataclass
class Best:
    """The best value so far of the validation figure that picks best.pt (``early_stop_metric``), the epoch
    that reached it, and the epochs since (what ``early_stop`` counts)."""

    value: float | None = None
    epoch: int = 0
    stale: int = 0

    def update(self, metric: str, record: dict[str, Any]) -> bool:
        """Take in an epoch's ``record``; whether it improved on the best (strictly: a tie is no progress)."""
        value = record.get(metric)
        if value is None:  # no validation split
            return False
        if self.value is None or (value > self.value if metric == "val_acc" else value < self.value):
            self.value, self.epoch, self.stale = value, record["epoch"], 0
            return True
        self.stale += 1
        return False

    def reason(self, metric: str) -> str:
        return (f"early stop: {metric} did not improve for {self.stale} epochs "
                f"(best {self.value:.4g} at epoch {self.epoch})")


@dataclass
class Progress:
    """Everything that changes while training and must survive a restart (besides the tensors' state)."""

    step: int = 0
    best_val: float | None = None  # the val_acc of best.pt
    sums: EpochSums = field(default_factory=EpochSums)
    saved_step: int = 0  # the step of the last checkpoint written
    best: Best = field(default_factory=Best)

    def patience_spent(self, cfg: TrainConfig) -> bool:
        return cfg.early_stop is not None and self.best.stale >= cfg.early_stop


def train(cfg: TrainConfig | None = None, resume: str | Path | None = None, device: str | None = None,
          stop_after: int | None = None, parent: tracking.Tracker | None = None,
          subset: Callable[[Splits], Splits] | None = None) -> Result:
    """Train from ``cfg`` into a new run folder, or continue the run in folder ``resume``.

    ``stop_after`` ends this call after that many steps with a checkpoint, for jobs with a time
    limit: the run goes on later with ``resume``. Started by torchrun, every rank calls this.
    ``parent``: the MLflow run of the group of seeds a new run belongs to (with ``mlflow``, rank 0).
    ``subset``, for a new run: what it trains on, from the splits ``cfg`` draws (cross-validation trains
    on part of the training split and reports on the rest); the run folder does not record it, so such a run
    cannot be resumed.
    """
    if stop_after is not None and stop_after < 1:
        raise UserError(f"`stop_after` must be at least 1 step (got {stop_after})")
    if subset is not None and resume is not None:
        raise UserError("`subset` is for a new run; a resumed run trains on the splits it was started with")
    group = distributed.setup(device or (cfg.device if cfg is not None else "auto"))
    try:
        return _train(group, cfg, resume, device, stop_after, parent, subset)
    except Exception as e:
        lost = distributed.describe_failure(e, group)
        if lost is None:
            raise
        raise UserError(lost) from None
    finally:
        distributed.teardown(group)


def _train(group: distributed.Group, cfg: TrainConfig | None, resume: str | Path | None, device: str | None,
           stop_after: int | None, parent: tracking.Tracker | None = None,
           subset: Callable[[Splits], Splits] | None = None) -> Result:
    # Only rank 0 touches the run folder's lock, config, logs and checkpoints; all ranks read.
    only_main = RunLock if group.main else (lambda _: nullcontext())
    if resume is not None:
        run_dir, path = _resume_checkpoint(Path(resume))
        with only_main(run_dir):  # before reading last.pt, so that no live run is rewriting it
            ckpt = checkpoint.read(path)
            if ckpt.training is None:
                raise UserError(f"{path} holds no training state to resume from; start a new run instead")
            try:
                cfg = from_saved(ckpt.config)
            except UserError as e:
                raise UserError(f"{path} holds an invalid training configuration: {e}") from None
            if device is not None:
                cfg.device = device
            validate(cfg)
            if cfg.mlflow:
                tracking.require(cfg.mlflow)  # before the data: a missing MLflow is said at once
            setup = prepare(cfg, group, run_dir, fresh=False)
            _check_same_run(ckpt, setup, path)
            _check_optimizer_fits(ckpt, setup, path)
            return _start(setup, ckpt, stop_after, path)
    assert cfg is not None
    if cfg.mlflow:
        tracking.require(cfg.mlflow)
    run_dir = Path(distributed.broadcast(str(_new_run_dir(cfg)) if group.main else None, group))
    _refuse_existing_run(run_dir)
    setup = prepare(cfg, group, run_dir, subset=subset)
    if group.main:
        # Only once the data and model are ready, so that a failed start leaves no empty run folder behind.
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run folder {run_dir}: {e.strerror}") from None
    with only_main(run_dir):
        if group.main:
            _refuse_existing_run(run_dir)  # again: another process may have started here meanwhile
        return _start(setup, None, stop_after, None, parent)


def prepare(cfg: TrainConfig, group: distributed.Group, run_dir: Path, fresh: bool = True,
            subset: Callable[[Splits], Splits] | None = None) -> Setup:
    """The device, the data splits (``subset`` of them, when given) and a freshly initialised model
    (seeded) for ``cfg``, with its starting weights (``--weights``, unless resuming: not ``fresh``) and
    frozen layers."""
    dev = distributed.device_for(group, pick_device(cfg.device))
    if dev.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.seed)
    dataset = open_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                           skip_bad_images=cfg.skip_bad_images, store_size=cfg.store_size, image_size=cfg.image_size)
    if dataset.skipped and group.main:
        shown = ", ".join(dataset.skipped[:5]) + (" …" if len(dataset.skipped) > 5 else "")
        log.warning(f"skipped {len(dataset.skipped)} unreadable image(s): {shown}")
    drawn = split(dataset, cfg.limit_train, cfg.limit_test, cfg.val_split, cfg.batch_size)
    data = place(subset(drawn) if subset is not None else drawn, dev, cfg.data_on_device, group.world)
    in_channels = data.train_x.shape[1]
    width = cfg.width if cfg.width is not None else default_width(cfg.model)
    spec = ModelSpec(cfg.model, len(data.classes), width, in_channels)
    model = build(spec.name, num_classes=spec.num_classes, width=spec.width, in_channels=spec.in_channels)
    _check_input_size(model, cfg, in_channels)
    if has_batchnorm(model):
        # In training, BatchNorm normalises with the statistics of the batch, which one image cannot give.
        if cfg.batch_size < 2:
            raise UserError(f"`batch_size` must be at least 2: {cfg.model} normalises with BatchNorm, whose batch "
                            "statistics one image cannot give (got 1)")
        if len(data.train_y) < 2:
            raise UserError(f"training {cfg.model} needs at least 2 images (it has {len(data.train_y)}): it "
                            "normalises with BatchNorm, which one image cannot give batch statistics; "
                            "raise `limit_train`")
        if group.world > 1 and not cfg.sync_bn and cfg.batch_size // group.world < 2:
            raise UserError(f"`batch_size` {cfg.batch_size} over {group.world} ranks gives some ranks one image a "
                            f"step, which BatchNorm cannot normalise; use `batch_size` {2 * group.world} or more, "
                            "or `sync_bn`")
    weights = pretrained.load(model, cfg.model, cfg.weights).to_dict() if cfg.weights and fresh else None
    frozen = transfer.freeze(model, cfg.freeze)
    preprocess = Preprocess(cfg.image_size, in_channels, cfg.mean, cfg.std)
    _initialise(model, cfg, data, preprocess, fresh)
    return Setup(cfg, dev, data, model, spec, preprocess, run_dir, group, weights, len(frozen))


def _initialise(model: nn.Module, cfg: TrainConfig, data: Splits, preprocess: Preprocess, fresh: bool) -> None:
    """airbench's initialisations that ``cfg`` asks for (a resumed run's weights come from its checkpoint, but
    its whitening filters stay fixed all the same), after checking that its shifts fit the images."""
    side = min(data.train_x.shape[-2:])
    if cfg.augment == "flip-crop" and cfg.translate is not None and cfg.translate >= side:
        raise UserError(f"`translate` {cfg.translate} reflects more pixels than the {side}-pixel training images "
                        f"have; use at most {side - 1}")
    if cfg.dirac_init and fresh:
        dirac_init(model)
    if cfg.whiten and fresh:
        whiten_first_conv(model, preprocess.to_input(data.train_x[:WHITEN_IMAGES]))
    elif cfg.whiten:
        first_conv(model).weight.requires_grad_(False)


def _check_input_size(model: nn.Module, cfg: TrainConfig, channels: int) -> None:
    """One image through a copy of the model on the meta device before anything else: a model that cannot
    take --image-size (a pool left with nothing to pool, a transformer made for one size) says so in one line
    instead of in a traceback. The meta device computes shapes only, so this costs nothing at any size."""
    probe = copy.deepcopy(model).to("meta").eval()
    try:
        with torch.no_grad():
            probe(torch.zeros(1, channels, cfg.image_size, cfg.image_size, device="meta"))
    except NotImplementedError:
        return  # an operation without a shape rule: the first real batch will tell
    except (RuntimeError, AssertionError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{cfg.model} cannot take {cfg.image_size} px inputs ({first}); choose another "
                        "`image_size`") from None


def _start(setup: Setup, ckpt: checkpoint.Checkpoint | None, stop_after: int | None,
           resumed_from: Path | None = None, parent: tracking.Tracker | None = None) -> Result:
    if setup.group.main:
        remove_stale(setup.run_dir / "checkpoints")  # half-written checkpoints of a process that was killed
        _write_config(setup)
    try:
        with StopSignals() as stop:
            return _fit(setup, ckpt, stop_after, stop, resumed_from, parent)
    except torch.cuda.OutOfMemoryError:
        cfg = setup.cfg
        per_rank = -(-cfg.batch_size // setup.group.world)
        raise UserError(f"the GPU ran out of memory with {per_rank} images per GPU at {cfg.image_size} px; "
                        f"try `batch_size` {max(cfg.batch_size // 2, 1)}, a smaller `image_size` or `amp`") from None


class Trainer:
    """The model, optimiser, schedule and the step function of one run, on its device."""

    def __init__(self, setup: Setup) -> None:
        cfg, dev, group = setup.cfg, setup.device, setup.group
        self.setup = setup
        self.amp = use_amp(cfg.amp, dev)
        self.channels_last = use_channels_last(cfg.channels_last, dev)
        self.model = setup.model.to(dev, memory_format=torch.channels_last if self.channels_last
                                    else torch.preserve_format)
        data = setup.data
        self.batches = TrainBatches(data.train_x.to(dev), data.train_y.to(dev), cfg.batch_size, setup.preprocess,
                                    cfg.augment, cfg.seed, self.channels_last, group.rank, group.world,
                                    merge_single=has_batchnorm(self.model), alternate=cfg.alternate_flips,
                                    translate=cfg.translate)
        self.scored = {"val": (data.val_x.to(dev), data.val_y.to(dev))} if len(data.val_y) else {}
        self.scored["test"] = (data.test_x.to(dev), data.test_y.to(dev))
        self.steps_per_epoch = len(self.batches)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        # The average is of the plain model (before sync-BN conversion): it only ever runs in eval mode.
        self.ema: WeightAverage | None = None
        if cfg.ema:
            self.ema = WeightAverage(self.model, cfg.ema)
        elif cfg.lookahead:
            self.ema = Lookahead(self.model, cfg.lookahead, cfg.lookahead_from * self.steps_per_epoch + 1,
                                 self.total_steps)
        # The whitening layer's bias, which trains for the first whiten_bias_epochs epochs only.
        self.whiten_bias = (first_conv(self.model).bias if cfg.whiten and cfg.whiten_bias_epochs is not None
                            else None)
        # What is scored, logged and saved as "model": the average when there is one.
        self.reported = self.ema.module if self.ema is not None else self.model
        forward = distributed.wrap(self.model, group, dev, cfg.sync_bn)  # before the optimizer sees the parameters
        self.optimizer = torch.optim.SGD(transfer.param_groups(self.model, cfg.lr, cfg.backbone_lr_scale,
                                                               cfg.norm_lr_scale, cfg.weight_decay),
                                         lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                         fused=dev.type == "cuda" or None)
        self.scheduler = _scheduler(cfg, self.optimizer, self.total_steps)
        # Summed, then divided by the global batch: N ranks' averaged gradients equal one process's.
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="sum")
        self.forward = compiled(forward, cfg.compile, cfg.cuda_graphs, dev)
        self.graphs = cfg.cuda_graphs and dev.type == "cuda"
        # Evaluation runs each rank's shard through the plain model: no collectives inside, so shards
        # of different lengths cannot leave a rank waiting.
        self.evaluator = self.reported if group.active or self.ema is not None else self.forward
        self.autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if self.amp else nullcontext()
        # Watched after every step (on the device, read back with the losses): the trained weights and
        # BatchNorm statistics. The same objects all run long (see WeightAverage).
        self.watched = [t.detach() for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point()]

    def restore(self, ckpt: checkpoint.Checkpoint, path: Path) -> Progress:
        t = ckpt.training
        assert t is not None
        try:
            self.model.load_state_dict(ckpt.train_model if ckpt.train_model is not None else ckpt.model)
            if self.ema is not None:
                self.ema.module.load_state_dict(ckpt.model)
            self.optimizer.load_state_dict(t["optimizer"])
            self.scheduler.load_state_dict(t["scheduler"])
            torch.set_rng_state(t["rng"]["torch"])
            if self.setup.device.type == "cuda" and t["rng"].get("cuda"):
                torch.cuda.set_rng_state_all(t["rng"]["cuda"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path}: its training state does not fit the run it describes ({first}); "
                            "the file is damaged or was edited; start a new run instead") from None
        if t["step"] > self.total_steps:
            raise UserError(f"{path} is at step {t['step']}, beyond the {self.total_steps} steps of its run; "
                            "the file is damaged or was edited")
        metric = self.setup.cfg.early_stop_metric
        # Written before early stopping: val_acc was what picked best.pt, and nothing counted epochs since.
        best = t.get("best") or {"metric": "val_acc", "value": t["best_val_acc"], "epoch": 0, "stale": 0}
        if best["metric"] != metric:
            raise UserError(f"{path} tracked the best {best['metric']}, but its configuration watches {metric}; "
                            "the file is damaged or was edited; start a new run instead")
        return Progress(t["step"], t["best_val_acc"], EpochSums(**t["partial_epoch"]), t["step"],
                        Best(best["value"], best["epoch"], best["stale"]))

    def weights_finite(self) -> torch.Tensor:
        """On the device, without waiting for it: whether no watched tensor holds NaN or +inf.

        One fused max over all of them (a few ms a step for the full-width model on a CPU). A weight
        that fell to -inf alone makes the next step's loss non-finite, and the exact check before
        every checkpoint (``check_finite``) catches it too.
        """
        return torch.stack(torch._foreach_max(self.watched)).isfinite().all()

    def step(self, x: torch.Tensor, y: torch.Tensor, n_global: int, step: int) -> StepStats:
        """One SGD step on this rank's part ``x``, ``y`` of a global batch of ``n_global`` images."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done with
        with self.autocast:
            logits = self.forward(x)
            loss_sum = self.criterion(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        (loss_sum * (self.setup.group.world / n_global)).backward()
        if self.whiten_bias is not None and (step - 1) // self.steps_per_epoch >= self.setup.cfg.whiten_bias_epochs:
            self.whiten_bias.grad = None  # fixed from then on: SGD leaves a parameter without a gradient alone
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(step)
        return StepStats(loss_sum.detach(), (logits.argmax(1) == y).sum(), len(y), lr, self.weights_finite())

    def evaluate(self, record: dict[str, Any]) -> dict[str, Any]:
        """Adds ``{val,test}_{loss,acc}`` over all ranks' shards to the epoch ``record``."""
        cfg, group = self.setup.cfg, self.setup.group
        for name, (vx, vy) in self.scored.items():
            vx, vy = distributed.shard(vx, group), distributed.shard(vy, group)
            s = score(self.evaluator, vx, vy, self.setup.preprocess, batch_size=max(cfg.batch_size, 256),
                      amp=self.amp, channels_last=self.channels_last, tta=cfg.tta)
            totals = distributed.all_sum(torch.tensor(
                [s.loss * len(vy), (s.predictions == s.labels).sum().item(), len(vy)], dtype=torch.float64,
                device=self.setup.device), group).tolist()
            record[f"{name}_loss"], record[f"{name}_acc"] = totals[0] / max(totals[2], 1), totals[1] / max(totals[2], 1)
        self.last_scored = (vx, vy, s.predictions)  # the (rank 0 shard of the) test set, for the log
        return record

    def save(self, progress: Progress, name: str) -> None:
        """Write the run's state as checkpoint ``name``, once every weight in it is known to be finite."""
        setup = self.setup
        self.check_finite(progress)
        progress.saved_step = progress.step
        if not setup.group.main:
            return
        training = {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": progress.step // self.steps_per_epoch, "step": progress.step,
            "best_val_acc": progress.best_val, "partial_epoch": asdict(progress.sums),
            "best": {"metric": setup.cfg.early_stop_metric, **asdict(progress.best)},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if setup.device.type == "cuda" else []},
        }
        checkpoint.write(checkpoint.Checkpoint(
            self.reported.state_dict(), setup.spec, setup.preprocess, setup.data.classes, setup.cfg.to_dict(),
            {"cnnlab": cnnlab.__version__, "torch": str(torch.__version__)},
            self.model.state_dict() if self.ema is not None else None, training, {"hash": setup.data.fingerprint}),
            setup.run_dir / "checkpoints" / name)

    def check_finite(self, progress: Progress) -> None:
        """Stop with the divergence message rather than save (or score) weights that are not finite.

        Every step's update is checked as it is logged (see ``_flush``); this also covers the weight
        average and the optimizer's momentum, and is what makes "the last good checkpoint" true.
        """
        tensors = list(self.watched)
        if self.ema is not None:
            tensors += [t for t in self.ema.module.state_dict().values() if t.is_floating_point()]
        tensors += [t for state in self.optimizer.state.values() for t in state.values()
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
        if bool(torch.stack([torch.stack(t.aminmax()) for t in tensors]).isfinite().all()):
            return
        raise UserError(
            f"training diverged: the weights became NaN or infinite between step {progress.saved_step} and step "
            f"{progress.step}, though every loss was finite; the learning rate "
            f"({self.scheduler.get_last_lr()[0]:g}) is most likely too high for this model and batch size, try a "
            f"lower `lr`; {_last_good(self.setup, progress)}")


def _fit(setup: Setup, ckpt: checkpoint.Checkpoint | None, stop_after: int | None, stop: StopSignals,
         resumed_from: Path | None = None, parent: tracking.Tracker | None = None) -> Result:
    cfg, group, run_dir = setup.cfg, setup.group, setup.run_dir
    t = Trainer(setup)
    if t.batches.dropped and group.main:
        log.warning(f"the last {t.batches.dropped} training image(s) of each epoch are left out: too few to split "
                    f"over {group.world} ranks (choose a `batch_size` that leaves a remainder of 0 or at least "
                    f"{group.world})")
    if t.batches.merged and group.main:
        log.warning("the last batch of each epoch would hold a single image, which BatchNorm cannot normalise: it "
                    "joins the batch before it (choose a `batch_size` that does not leave a remainder of 1)")
    p = t.restore(ckpt, resumed_from or run_dir) if ckpt is not None else Progress()
    if p.step >= t.total_steps:
        raise UserError(f"the run in {run_dir} already finished all {cfg.epochs} epochs; nothing to resume")
    if p.patience_spent(cfg):
        raise UserError(f"the run in {run_dir} already ended ({p.best.reason(cfg.early_stop_metric)}); "
                        "nothing to resume")
    if cfg.early_stop is not None and not len(setup.data.val_y):
        raise UserError(f"`early_stop` watches the validation split, but {len(setup.data.train_y)} training "
                        "images leave none by default; hold out images with `val_split` N, or drop `early_stop`")
    run_log = RunLog(run_dir, t.total_steps, start_step=p.step, epochs=cfg.epochs) if group.main else None
    try:
        with _tracker(setup, ckpt is not None, parent) as tracker:
            if p.step == 0 or (resumed_from is not None and resumed_from.name != "last.pt"):
                if run_log is not None and p.step == 0:
                    run_log.hyperparameters(cfg.to_dict())
                t.save(p, "last.pt")  # so that even a run that fails in its first epoch can be resumed or inspected
            started = p.step
            last = _epochs(t, p, run_log, tracker, p.step + stop_after if stop_after else None, stop)
            result = _ended(setup, Result(run_dir, last, p.best_val, p.step, started), p, t.total_steps)
            if tracker is not None and result.stopped is not None:
                tracker.finish(result.stopped, [run_dir / "checkpoints" / name for name in ("last.pt", "best.pt")])
            return result
    finally:
        if run_log is not None:
            run_log.close()


def _tracker(setup: Setup, resume: bool, parent: tracking.Tracker | None) -> Any:
    """The run's MLflow run (rank 0, with `mlflow`), continued when resuming; else nothing."""
    cfg = setup.cfg
    if not (cfg.mlflow and setup.group.main):
        return nullcontext()
    tracker = tracking.Tracker.start(cfg.mlflow, setup.run_dir, cfg.to_dict(), parent, resume)
    if resume:
        tracker.catch_up(setup.run_dir)
    return tracker


def _epochs(t: Trainer, p: Progress, run_log: RunLog | None, tracker: tracking.Tracker | None, stop_at: int | None,
            stop: StopSignals) -> dict[str, Any]:
    """The epochs from where ``p`` stands to the end of the run (or an early stop, or ``stop_at``); returns
    the last epoch's record ({} when none ended). Each epoch is logged to MLflow after its checkpoint, so
    that MLflow never holds an epoch that a run resumed from last.pt trains again."""
    setup, cfg = t.setup, t.setup.cfg
    last: dict[str, Any] = {}
    t.model.train()
    for epoch in range(p.step // t.steps_per_epoch, cfg.epochs):
        lr = _run_epoch(t, p, run_log, epoch, stop_at, stop)
        if p.step < (epoch + 1) * t.steps_per_epoch:
            break  # stopped mid-epoch by --stop-after, with a checkpoint
        if t.ema is not None:
            t.ema.end_epoch(p.step)
        t.check_finite(p)  # before scoring and logging weights that could not be saved
        record = t.evaluate(p.sums.record(epoch + 1, p.step, lr))
        if run_log is not None:
            run_log.filters(t.reported, p.step)
            run_log.predictions(*t.last_scored[:2], t.last_scored[2], setup.data.classes, p.step)
            run_log.epoch(record)
        p.sums, last = EpochSums(), record
        improved = p.best.update(cfg.early_stop_metric, record)
        if improved:
            p.best_val = record["val_acc"]
        t.save(p, "last.pt")
        if improved:
            t.save(p, "best.pt")
        if tracker is not None:
            tracker.epoch(record)
        if p.patience_spent(cfg):
            break
        if p.step < t.total_steps and stop.agreed(t, at_flush=True):
            raise stop.interrupted(p, epoch + 1, setup.run_dir)
        if stop_at is not None and p.step >= stop_at:
            break
    return last


def _ended(setup: Setup, result: Result, p: Progress, total_steps: int) -> Result:
    """``result`` with why the run ended (early stop, or all its epochs done), which config.json records too;
    unchanged while the run goes on (stopped by ``stop_after``)."""
    cfg = setup.cfg
    if p.patience_spent(cfg):
        result.stopped = p.best.reason(cfg.early_stop_metric)
        result.best = epoch_record(setup.run_dir, p.best.epoch) if setup.group.main else {}
    elif p.step >= total_steps:
        result.stopped = "finished"
    if result.stopped is not None and setup.group.main:
        _write_config(setup, result.stopped)
    return result


def _run_epoch(t: Trainer, p: Progress, log: RunLog | None, epoch: int, stop_at: int | None,
               stop: StopSignals) -> float:
    """The steps of ``epoch`` from where ``p`` stands, logged a window at a time; returns the last step's
    learning rate. Returns early, after a checkpoint, when ``stop_at`` is reached mid-epoch; raises
    ``Interrupted``, after a checkpoint, at the first step boundary after SIGINT or SIGTERM."""
    cfg = t.setup.cfg
    first = p.step - epoch * t.steps_per_epoch
    pending: list[StepStats] = []
    tick, lr = time.perf_counter(), float("nan")
    for i, (x, y, n_global) in enumerate(t.batches.epoch(epoch, first), start=first):
        stats = t.step(x, y, n_global, p.step + 1)
        p.step, lr = p.step + 1, stats.lr
        pending.append(stats)
        end_of_epoch = i == t.steps_per_epoch - 1
        stopping = stop_at is not None and p.step >= stop_at and not end_of_epoch
        mid_checkpoint = not end_of_epoch and (stopping or cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0)
        flush = len(pending) == FLUSH_EVERY or end_of_epoch or mid_checkpoint
        # A signal is acted on at this step boundary (with several ranks: at the next window, all together).
        signalled = not end_of_epoch and stop.agreed(t, at_flush=flush)
        if flush or signalled:
            _flush(log, epoch + 1, p, pending, time.perf_counter() - tick, t)
            pending, tick = [], time.perf_counter()
        if mid_checkpoint or signalled:
            t.save(p, "last.pt")
        if signalled:
            raise stop.interrupted(p, epoch + 1, t.setup.run_dir)
        if stopping:
            break
    return lr


def _flush(log: RunLog | None, epoch: int, p: Progress, pending: list[StepStats], seconds: float, t: Trainer) -> None:
    """Read a window of per-step numbers back from the device in one go (summed over ranks) and log them.

    Stops training with a message at the first step whose loss is not finite, after logging the steps before it.
    """
    device = pending[0].loss_sum.device
    sums = torch.stack([torch.stack([s.loss_sum for s in pending]).double(),
                        torch.stack([s.correct for s in pending]).double(),
                        torch.tensor([float(s.size) for s in pending], dtype=torch.float64, device=device),
                        torch.stack([s.finite for s in pending]).double()])
    loss_sums, correct, sizes, finite = distributed.all_sum(sums, t.setup.group).tolist()
    losses = [loss_sum / n for loss_sum, n in zip(loss_sums, sizes)]
    first = p.step - len(pending) + 1
    bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), len(losses))
    # A step whose loss was finite but whose update left a weight NaN or infinite diverged too: it and
    # what follows are not logged, and no checkpoint is written after it.
    broken = next((i for i, ok in enumerate(finite) if ok < t.setup.group.world), len(losses))
    weights_first = broken < bad
    bad = min(bad, broken)
    good = slice(0, bad)
    if bad:
        p.sums.loss_sum += sum(loss * n for loss, n in zip(losses[good], sizes[good]))
        p.sums.correct += int(sum(correct[good]))
        p.sums.seen += int(sum(sizes[good]))
        p.sums.seconds += seconds * bad / len(pending)
        if log is not None:
            log.steps(epoch, first, losses[good], [c / n for c, n in zip(correct[good], sizes[good])],
                      [s.lr for s in pending[good]], sum(sizes[good]) / max(seconds * bad / len(pending), 1e-9))
    if bad < len(losses):
        what = (f"the weights became NaN or infinite at step {first + bad} (epoch {epoch}; its loss, "
                f"{losses[bad]:.4g}, was still finite)" if weights_first else
                f"the loss became {losses[bad]} at step {first + bad} (epoch {epoch})")
        raise UserError(
            f"training diverged: {what}; the learning rate ({pending[bad].lr:g}) is most likely too high for this "
            f"model and batch size, try a lower `lr`; {_last_good(t.setup, p)}")


def _last_good(setup: Setup, p: Progress) -> str:
    """Where the divergence message sends the user: the last checkpoint, finite by construction."""
    return f"the last good checkpoint (step {p.saved_step}) is {setup.run_dir / 'checkpoints' / 'last.pt'}"


class StopSignals:
    """SIGINT and SIGTERM while training: noted by the handler, acted on at the next step boundary.

    There the trainer writes ``last.pt`` and raises :class:`Interrupted`, which the command turns into
    one line naming the resume command and exit status 130 (SIGINT) or 143 (SIGTERM). A second signal
    before that boundary stops at once (the previous checkpoint is intact). Installed only in the main
    thread, and not over a signal that is ignored; elsewhere (a notebook's worker thread) signals keep
    their usual effect.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) != signal.SIG_IGN:  # a nohup'd or background job keeps ignoring it
                    self.previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _note(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} before the next checkpoint; "
                                      "the last one is intact")
        self.signum = signum

    def agreed(self, t: Trainer, at_flush: bool) -> bool:
        """Whether to stop now. One process checks at every step; several ranks at each logging window,
        where they all are, so that they stop at the same step (a signal reaches them at different times)."""
        group = t.setup.group
        if not group.active:
            return self.signum is not None
        if not at_flush:
            return False
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=t.setup.device)
        if distributed.all_sum(flag, group).item() == 0:
            return False
        self.signum = self.signum or signal.SIGTERM  # a peer was signalled; this rank stops with it
        return True

    def interrupted(self, p: Progress, epoch: int, run_dir: Path) -> Interrupted:
        name = signal.Signals(self.signum or signal.SIGTERM).name
        return Interrupted(self.signum or signal.SIGTERM,
                           f"stopped by {name} at step {p.step} (epoch {epoch}) with a checkpoint; "
                           f"continue with: cnnlab train --resume {run_dir}")


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` normalises with batch statistics while training (cnnlab's ResNets and VGGs
    do; AlexNet and many torchvision and timm models do not)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Per-step learning-rate schedules; their state goes into every checkpoint."""
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=total_steps)
    if cfg.schedule == "onecycle" and total_steps >= 2:
        # Momentum is left as configured: --momentum should mean what it says. The warm-up is a
        # quarter of the run, but more than one step: OneCycleLR divides by its length.
        return sched.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
                                pct_start=max(0.25, 1.5 / total_steps), anneal_strategy="linear",
                                cycle_momentum=False)
    if cfg.schedule == "triangle":
        return sched.LambdaLR(optimizer, partial(triangle, total=total_steps))
    return sched.LambdaLR(optimizer, lambda _: 1.0)


def triangle(step: int, total: int, start: float = 0.2, peak_at: float = 0.23, end: float = 0.07) -> float:
    """airbench's schedule (Jordan 2024): the multiple of the peak rate at ``step`` of ``total``, linear from
    ``start`` up to 1 at step ``int(peak_at · total)`` and down to ``end`` at ``total``."""
    peak = int(peak_at * total)
    if step < peak:
        return start + (1 - start) * step / peak
    return 1 + (end - 1) * (step - peak) / max(total - peak, 1)


def new_run_dir(prefix: str, parent: str | Path = "runs") -> Path:
    """``runs/PREFIX-YYYYmmdd-HHMMSS``, with a counter added when two runs start in the same second."""
    stem = Path(parent) / f"{prefix}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path


def _new_run_dir(cfg: TrainConfig) -> Path:
    run_dir = new_run_dir(f"{cfg.recipe}-{cfg.model}") if cfg.out is None else Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"`out` {run_dir} is a file; give a folder for the run")
    return run_dir


def _refuse_existing_run(run_dir: Path) -> None:
    checkpoints = run_dir / "checkpoints"
    if (checkpoints / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run; continue it with `resume` {run_dir} "
                        "or choose another `out`")
    if (checkpoints / "best.pt").exists():
        raise UserError(f"{run_dir} already holds a run whose checkpoints/last.pt is missing; continue it from "
                        f"its best.pt with `resume` {checkpoints / 'best.pt'}, or choose another `out`")


def _resume_checkpoint(given: Path) -> tuple[Path, Path]:
    """The run folder and the checkpoint to continue from: the folder's last.pt, or a checkpoint file
    in ``RUN_DIR/checkpoints`` (best.pt, when last.pt was lost)."""
    if given.is_file():
        if given.parent.name != "checkpoints":
            raise UserError(f"`resume` {given}: give a run folder, "
                            "or a checkpoint in one (RUN_DIR/checkpoints/best.pt)")
        return given.parent.parent, given
    if not given.is_dir():
        raise UserError(f"`resume` {given}: no such run folder")
    path = given / "checkpoints" / "last.pt"
    best = given / "checkpoints" / "best.pt"
    if not path.is_file() and best.is_file():
        raise UserError(f"`resume` {given}: its checkpoints/last.pt is missing, but best.pt is there; continue "
                        f"from best.pt (the steps after it are trained again) with: cnnlab train --resume {best}")
    if not path.is_file():
        raise UserError(f"`resume` {given}: it holds no checkpoints/last.pt to continue from; "
                        f"start a new run with `out` {given}")
    return given, path


def _check_same_run(ckpt: checkpoint.Checkpoint, setup: Setup, path: Path) -> None:
    if (ckpt.spec, ckpt.preprocess, ckpt.classes) != (setup.spec, setup.preprocess, setup.data.classes):
        raise UserError("the checkpoint's model or classes differ from what its configuration now builds "
                        "(was the dataset changed?); start a new run instead of resuming")
    saved = ckpt.data.get("hash")
    if saved is not None and saved != setup.data.fingerprint:
        raise UserError(f"`resume`: the dataset {setup.cfg.dataset} is not the one {path} was trained on (same "
                        "classes, but the images changed since; their content hash differs): resuming would "
                        "continue on other data; restore the original data, or start a new run with `out`")


def _check_optimizer_fits(ckpt: checkpoint.Checkpoint, setup: Setup, path: Path) -> None:
    """The saved optimizer state against the parameters this run trains, before anything is written: as
    many groups, as many parameters in each, momentum buffers of their parameters' shapes (torch takes
    any others, and the first step fails on them). The values themselves were checked on reading."""
    assert ckpt.training is not None

    def refuse(what: str) -> UserError:
        return UserError(f"{path}: {what}; the file is damaged or was edited; start a new run instead")

    saved = ckpt.training["optimizer"]
    cfg = setup.cfg
    own = transfer.param_groups(setup.model, cfg.lr, cfg.backbone_lr_scale, cfg.norm_lr_scale, cfg.weight_decay)
    if len(saved["param_groups"]) != len(own):
        raise refuse(f"optimizer.param_groups has {len(saved['param_groups'])} groups, but the run trains its "
                     f"parameters in {len(own)}")
    params: dict[int, torch.Tensor] = {}
    for i, (theirs, ours) in enumerate(zip(saved["param_groups"], own)):
        if len(theirs["params"]) != len(ours["params"]):
            raise refuse(f"optimizer.param_groups[{i}] holds {len(theirs['params'])} parameters, but the run "
                         f"trains {len(ours['params'])} in it")
        params.update(zip(theirs["params"], ours["params"]))
    for index, entry in saved["state"].items():
        buffer = entry.get("momentum_buffer")
        if isinstance(buffer, torch.Tensor) and buffer.shape != params[index].shape:
            raise refuse(f"optimizer.state[{index}].momentum_buffer has shape {list(buffer.shape)}, but its "
                         f"parameter {list(params[index].shape)}")


def _write_config(setup: Setup, stopped: str | None = None) -> None:
    """The run's config.json; ``stopped`` says why the run ended (null while it goes on)."""
    cfg, dev, data, group = setup.cfg, setup.device, setup.data, setup.group
    weights = setup.weights
    if weights is None and cfg.weights:  # resumed: the weights were loaded when the run started
        try:
            weights = json.loads((setup.run_dir / "config.json").read_text()).get("weights")
        except (OSError, ValueError):
            weights = None
    info = {
        "config": cfg.to_dict(),
        "cnnlab": cnnlab.__version__, "torch": str(torch.__version__),
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "amp": amp_choice(cfg.amp, dev),
        "weights": weights, "frozen_tensors": setup.frozen,
        "world_size": group.world, "global_batch": cfg.batch_size,
        "per_rank_batch": -(-cfg.batch_size // group.world),  # the global batch, split as evenly as possible
        "data": {"classes": data.classes, "hash": data.fingerprint, "train": len(data.train_y),
                 "val": len(data.val_y), "test": len(data.test_y), "stored_size": list(data.train_x.shape[1:]),
                 "on_device": isinstance(data.train_x, torch.Tensor),
                 "skipped_images": data.skipped},
        "stopped": stopped,
    }
    atomic_write(setup.run_dir / "config.json", json.dumps(info, indent=2))
