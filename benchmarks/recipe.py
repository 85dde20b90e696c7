"""Which levers the ``fast`` recipe uses, chosen by measurement: one-change ablations trained side by side.

Every variant is the ``fast`` recipe with one setting changed, trained from the same seed on the same
split. Each run is scored on the validation split (what chooses) and on the test set (reported only),
with and without test-time flip augmentation and with the six-view TTA (flips and 1-pixel shifts), from
its final weights (the weight average, when the variant keeps one). Wall time is the training call's.
Each variant runs in a fresh process, so its peak host memory (and peak GPU memory, on a GPU) is its own.

The parts of airbench94's method (Jordan 2024) are measured one change at a time both ways (``--airbench``):
each added to the ``fast`` recipe (does it carry over to ResNet-18?), and each taken out of the
``airbench`` recipe (what does it bring there?).

    python -m benchmarks.recipe                     # CPU scale (width 16, 10 epochs): ~25 min on 2 cores
    python -m benchmarks.recipe --width 64 --epochs 18 --device cuda   # the recipe's own scale, on a GPU
    python -m benchmarks.recipe --airbench           # the airbench rows (fast at width 16, airbench94 at 64)

bf16 autocast is on by default where bf16 is native (CUDA, or a CPU with bf16 instructions) and off
elsewhere; ``--amp``/``--no-amp`` choose, and each row records what its run trained in.

Prints a table and writes ``benchmarks/results/recipe-{cpu,cuda}-YYYYMMDD.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import isolate, report
from cnnlab.core.device import pick_device
from cnnlab.train.device import amp_choice

# Row → changes to the fast recipe (the recipe itself is the first row, whatever it currently is); "recipe"
# names another recipe to change instead.
FAST_WIDTH = 16  # the fast rows' default width on a CPU; the airbench rows keep airbench94's own
AIRBENCH = {"recipe": "airbench"}
VARIANTS: dict[str, dict[str, Any]] = {
    "fast recipe": {},
    "label smoothing 0": {"label_smoothing": 0.0},
    "label smoothing 0.1": {"label_smoothing": 0.1},
    "label smoothing 0.2": {"label_smoothing": 0.2},
    "EMA 0.98": {"ema": 0.98},
    "EMA 0.995": {"ema": 0.995},
    "no EMA": {"ema": 0.0},
    "no nesterov": {"nesterov": False},
    "batch 256, lr 0.2": {"batch_size": 256, "lr": 0.2},
    "cosine schedule": {"schedule": "cosine"},
    # Not a cnnlab setting: the benchmark splits the optimizer's groups itself (see _decay_weights_only).
    "no weight decay on BN and biases": {"decay_weights_only": True},
    # airbench's parts, one at a time, added to the fast recipe ...
    "fast + whitening": {"whiten": True},
    "fast + identity init": {"dirac_init": True},
    "fast + alternating flips": {"alternate_flips": True},
    "fast + 2-px reflected shifts": {"translate": 2},
    "fast + Lookahead": {"lookahead": 5, "lookahead_from": 3},
    "fast + BN lr x64": {"norm_lr_scale": 64.0},
    "fast + label smoothing 0.2": {"label_smoothing": 0.2},
    # ... and taken out of the airbench recipe.
    "airbench recipe": {**AIRBENCH},
    "airbench - whitening": {**AIRBENCH, "whiten": False},
    "airbench - identity init": {**AIRBENCH, "dirac_init": False},
    "airbench - alternating flips": {**AIRBENCH, "alternate_flips": False},
    "airbench, 4-px zero-padded crops": {**AIRBENCH, "translate": None},
    "airbench - Lookahead": {**AIRBENCH, "lookahead": 0},
    "airbench - BN lr x64": {**AIRBENCH, "norm_lr_scale": 1.0},
    "airbench - label smoothing": {**AIRBENCH, "label_smoothing": 0.0},
    "airbench - triangle schedule": {**AIRBENCH, "schedule": "onecycle"},
}
DEFAULT = ("fast recipe", "label smoothing 0", "label smoothing 0.2", "EMA 0.98", "EMA 0.995")  # others: --variants
AIRBENCH_ROWS = ("fast recipe", *(name for name in VARIANTS if name.startswith(("fast +", "airbench"))))


def variant_config(changes: dict[str, Any], base: dict[str, Any], out: Path):
    """The configuration of a variant: its recipe (fast unless ``changes`` names another) with ``base`` and
    ``changes`` over it, scored without TTA while training (the rows score every way afterwards)."""
    from cnnlab.config import resolve

    settings = {k: v for k, v in changes.items() if k not in ("recipe", "decay_weights_only")}
    recipe = changes.get("recipe", "fast")
    width = base.get("width") or (FAST_WIDTH if recipe == "fast" else None)  # None: the recipe model's own
    cfg = resolve(recipe, overrides={**base, "width": width, **settings, "out": str(out), "tta": False})
    if "translate" in settings and settings["translate"] is None:
        cfg.translate = None  # resolve reads an override of None as "not given"
    return cfg


def run_variant(name: str, changes: dict[str, Any], base: dict[str, Any], runs: Path) -> dict[str, Any]:
    from cnnlab.core.metrics import score
    from cnnlab.data import load_dataset
    from cnnlab.data.splits import split
    from cnnlab.run import load
    from cnnlab.train.engine import train

    out = runs / name.replace(" ", "-").replace(",", "")
    shutil.rmtree(out, ignore_errors=True)
    if changes.get("decay_weights_only"):
        _decay_weights_only()
    cfg = variant_config(changes, base, out)
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    amp = json.loads((out / "config.json").read_text())["amp"]
    run = load(out / "checkpoints" / "last.pt", cfg.device if cfg.device != "auto" else "cpu")
    data = split(load_dataset(cfg.dataset), cfg.limit_train, cfg.limit_test, cfg.val_split)
    device = next(run.model.parameters()).device
    row: dict[str, Any] = {"name": name, "changes": changes, "train_s": seconds, "amp": amp, **_gpu_peak(device),
                           "settings": {k: getattr(cfg, k) for k in ("label_smoothing", "nesterov", "ema", "lr",
                                                                     "epochs", "batch_size", "width", "recipe",
                                                                     "model", "whiten", "dirac_init",
                                                                     "alternate_flips", "translate", "lookahead",
                                                                     "norm_lr_scale", "schedule")}}
    for split_name, (x, y) in {"val": (data.val_x, data.val_y), "test": (data.test_x, data.test_y)}.items():
        for tta, suffix in ((False, ""), (True, "_tta"), ("translate", "_tta6")):
            s = score(run.model, x.to(device), y.to(device), run.preprocess, tta=tta)
            row[f"{split_name}{suffix}"] = 100 * s.top1
    row["n_val"], row["n_test"] = len(data.val_y), len(data.test_y)
    return row


def _decay_weights_only() -> None:
    """Weight decay on conv and linear weights alone, none on BatchNorm's scales and shifts or on biases
    (a common variant, e.g. timm's ``param_groups_weight_decay``); for this process only."""
    from cnnlab.models import transfer

    grouped = transfer.param_groups

    def param_groups(model: torch.nn.Module, lr: float, *scales: float, **named: float) -> list[dict]:
        groups = []
        for group in grouped(model, lr, *scales, **named):
            matrices = [p for p in group["params"] if p.ndim > 1]
            vectors = [p for p in group["params"] if p.ndim <= 1]
            groups += [{**group, "params": matrices}, {**group, "params": vectors, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    transfer.param_groups = param_groups


def _gpu_peak(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"gpu_peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}


def _child_rows() -> dict:
    def variant(spec: dict[str, Any]) -> dict[str, Any]:
        return run_variant(spec["name"], VARIANTS[spec["name"]], spec["base"], Path(spec["runs"]))
    return {"variant": variant}


COLUMNS = [("name", "variant"), ("val", "val %"), ("val_tta", "val % flip TTA"), ("val_tta6", "val % 6-view TTA"),
           ("test", "test %"), ("test_tta", "test % flip TTA"), ("test_tta6", "test % 6-view TTA"),
           ("train_s", "train s"), ("host_rss_peak_mb", "host peak MiB"), ("gpu_peak_mb", "GPU peak MiB")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=None, help="default: folder:$CNNLAB_CIFAR10_JPEG, else the bundled sample")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, help=f"default: {FAST_WIDTH} for the fast rows, airbench94's 64 for "
                                                   "the airbench rows")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit-train", type=int)
    parser.add_argument("--seed", type=int, default=0, help="the seed of every variant (initial weights, batch order)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction,
                        help="bf16 autocast (default: where bf16 is native, i.e. CUDA or a CPU with bf16 instructions)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--airbench", action="store_true",
                        help="the rows of airbench's parts, added to fast and taken out of airbench")
    parser.add_argument("--out", type=Path, help="folder for the JSON (default benchmarks/results)")
    parser.add_argument("--runs", type=Path, default=Path(__file__).parent / "runs" / "recipe",
                        help="folder for the variants' run folders (default benchmarks/runs/recipe)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one variant in this process
    args = parser.parse_args(argv)
    if args.row:
        isolate.child_main(args.row, _child_rows())
        return 0
    archive = os.environ.get("CNNLAB_CIFAR10_JPEG")
    dataset = args.dataset or (f"folder:{Path(archive).resolve()}" if archive else "sample")
    if args.amp is None:  # the trainer's check for --amp: emulated bf16 would make a CPU run many times slower
        args.amp = amp_choice(True, pick_device(args.device))["used"] == "bf16"
    base = {"dataset": dataset, "device": args.device, "width": args.width, "epochs": args.epochs,
            "limit_train": args.limit_train, "amp": args.amp, "seed": args.seed}
    runs = args.runs
    started = time.perf_counter()
    rows = []
    for name in args.variants or (AIRBENCH_ROWS if args.airbench else DEFAULT):
        job = {"section": "variant", "name": name, "base": base, "runs": str(runs.resolve())}
        rows.append({"name": name, **isolate.run("benchmarks.recipe", job, timeout_s=6 * 3600)})
        print(report.format_table(rows[-1:], COLUMNS).splitlines()[-1], file=sys.stderr, flush=True)
    document = {"benchmark": "recipe", "machine": report.machine_info(), "dataset": dataset, "base": base,
                "command": report.command_line(), "total_s": time.perf_counter() - started, "rows": rows}
    print(report.format_table(rows, COLUMNS))
    kind = "cuda" if args.device == "cuda" else "cpu"
    date = document["machine"]["date"].replace("-", "")
    name = f"recipe-{kind}-{date}" + (f"-seed{args.seed}" if args.seed else "") + ".json"
    print(f"\nwritten {report.write_json(document, name, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
