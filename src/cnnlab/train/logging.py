"""Where a run's numbers go: TensorBoard (``tb/``), ``metrics.jsonl`` and a progress bar on stderr.

Everything is keyed by the global optimizer step, so a resumed run can cut both logs back to the
step of its checkpoint and carry on without duplicated or stale points.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import make_grid
from tqdm import tqdm

from cnnlab.core.errors import UserError, one_line

# Epoch-record keys → TensorBoard tags (per-step train/loss and train/acc are the assignment's curves).
EPOCH_TAGS = {
    "train_loss": "epoch/train_loss", "train_acc": "epoch/train_acc",
    "val_loss": "val/loss", "val_acc": "val/acc",
    "test_loss": "test/loss", "test_acc": "test/acc",
    "images_per_s": "perf/images_per_s", "seconds": "perf/epoch_seconds",
}
HPARAM_METRICS = ("test/acc", "val/acc", "epoch/train_acc")
SAMPLE_IMAGES = 16  # the test images whose predictions are shown every epoch
FILTER_PIXELS = 32  # conv1 filters are enlarged (nearest neighbour) to about this many pixels a side


class RunLog:
    """The logs of one training run; ``start_step`` > 0 continues a run from its checkpoint."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, epochs: int = 1):
        self.metrics_path = run_dir / "metrics.jsonl"
        if start_step:
            _truncate_metrics(self.metrics_path, start_step)
        # purge_step hides events a crashed process wrote after the checkpoint we resume from.
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.metrics = self.metrics_path.open("a")
        self.epochs = epochs
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty(), file=sys.stderr)

    def hyperparameters(self, config: dict[str, Any]) -> None:
        """The configuration, as text and in TensorBoard's HParams view (metrics come from the scalars)."""
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
        for summary in hparams(flat, {tag: 0.0 for tag in HPARAM_METRICS}):
            self.writer.file_writer.add_summary(summary)

    def filters(self, model: nn.Module, step: int) -> None:
        """The first convolution's filters as one image grid (tag ``conv1/filters``), each scaled to [0, 1]."""
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            return
        w = conv.weight.detach().float().cpu()
        if w.shape[1] not in (1, 3):
            w = w.mean(1, keepdim=True)
        low = w.amin(dim=(1, 2, 3), keepdim=True)
        high = w.amax(dim=(1, 2, 3), keepdim=True)
        w = (w - low) / (high - low).clamp(min=1e-12)
        scale = max(1, FILTER_PIXELS // max(w.shape[-2:]))
        w = w.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        grid = make_grid(w, nrow=int(math.ceil(math.sqrt(len(w)))), padding=max(1, scale // 2), pad_value=1.0)
        self.writer.add_image("conv1/filters", grid, step)

    def predictions(self, images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor,
                    classes: list[str], step: int) -> None:
        """A labelled figure of ``SAMPLE_IMAGES`` images spread evenly over ``images`` (the same ones every
        epoch), tag ``predictions``: predicted class over the true one, green when right, red when wrong."""
        total = min(len(images), len(labels), len(preds))
        if total == 0:
            return
        picks = torch.linspace(0, total - 1, min(SAMPLE_IMAGES, total)).round().long().unique().tolist()
        n = len(picks)
        cols = min(n, 8)
        rows = -(-n // cols)
        fig = Figure(figsize=(1.5 * cols, 1.7 * rows), dpi=100)  # not pyplot: no global state to clean up
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i, ax in zip(picks, axes.flat):
            img = images[i].detach().cpu().numpy()
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255)
            p, t = int(preds[i]), int(labels[i])
            # Escaped: a control character in a class name has no glyph, and matplotlib warns for each one.
            ax.set_title(f"{one_line(classes[p])}\n({one_line(classes[t])})", fontsize=7,
                         color="green" if p == t else "red")
        fig.suptitle("predicted (true)", fontsize=8)
        fig.tight_layout()
        self.writer.add_figure("predictions", fig, step, close=False)

    def steps(self, epoch: int, first_step: int, losses: list[float], accs: list[float],
              lrs: list[float], images_per_s: float) -> None:
        for i, (loss, acc, lr) in enumerate(zip(losses, accs, lrs)):
            step = first_step + i
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/acc", acc, step)
            self.writer.add_scalar("lr", lr, step)
            self._write({"kind": "step", "epoch": epoch, "step": step, "loss": loss, "acc": acc, "lr": lr})
        self.writer.add_scalar("perf/images_per_s", images_per_s, first_step + len(losses) - 1)
        self.bar.set_description(f"epoch {epoch}/{self.epochs}")
        self.bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.3f}", img_s=f"{images_per_s:.0f}")
        self.bar.update(len(losses))
        self.metrics.flush()  # so that `tail -f metrics.jsonl` and a crash show every logged step

    def epoch(self, record: dict[str, Any]) -> None:
        for key, tag in EPOCH_TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], record["step"])
        self._write({"kind": "epoch", **record})
        self.metrics.flush()
        self.writer.flush()
        parts = [f"epoch {record['epoch']}/{self.epochs}"]
        for key in ("train_loss", "train_acc", "val_acc", "test_acc"):
            if record.get(key) is not None:
                parts.append(f"{key} {record[key]:.4f}")
        parts.append(f"{record['images_per_s']:.0f} img/s")
        self.bar.write("  ".join(parts), file=sys.stderr)

    def _write(self, record: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        self.writer.close()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records up to ``last_step``; the resumed run rewrites what came after."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the crash
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Step and epoch records of ``metrics.jsonl`` (the last record of each step or epoch wins)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl, so it is not a finished cnnlab run folder; "
                        f"train into it first with: cnnlab train --out {run_dir}")
    steps: dict[int, dict[str, Any]] = {}
    epochs: dict[int, dict[str, Any]] = {}
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = record["kind"]
            if kind == "step":
                steps[int(record["step"])] = record
            elif kind == "epoch":
                epochs[int(record["epoch"])] = record
        except (ValueError, KeyError, TypeError):
            bad += 1
    if not epochs:
        raise UserError(f"{path} records no finished epoch yet; a report needs at least one "
                        f"(let training finish an epoch, or continue it with: cnnlab train --resume {run_dir})")
    return [steps[k] for k in sorted(steps)], [epochs[k] for k in sorted(epochs)], bad


def epoch_record(run_dir: Path, epoch: int) -> dict[str, Any]:
    """The record of ``epoch`` in the run's metrics.jsonl, without its ``kind`` ({} when it is not there)."""
    _, epochs, _ = read_metrics(run_dir)
    return next(({k: v for k, v in r.items() if k != "kind"} for r in epochs if r["epoch"] == epoch), {})
