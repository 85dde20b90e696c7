"""GPU benchmarks on one card, in one go: what ``benchmarks/gpu.sh`` runs.

Rows, each in a fresh process (see :mod:`benchmarks.isolate`) so that its peak memory is its own:

* ``bf16 matmul``: the card's measured bf16 matrix rate (square matmuls timed with CUDA events),
  the denominator of model FLOPs utilisation;
* ``decode``: reading the JPEG archive into cnnlab's cache (first time) and from it (every later run);
* ``seed 20 epochs``: ``python -m cnnlab train --recipe seed --epochs 20`` on all 50,000 training
  images (``--val-split 0``, as the assignment trained), wall time from command start to its final
  test accuracy;
* ``fast`` and ``fast N epochs``: the ``fast`` recipe at its default and at a longer schedule (the
  recipe scores with test-time flip augmentation); each run's final weights are also scored without
  the flips, to show what they add;
* ``airbench``: the ``airbench`` recipe (airbench94's network and method, Jordan 2024, who reports 94% in
  about 3 s on an A100), scored with its six-view TTA, its final weights also without;
* ``MFU``: resnet18 (Table 1) at 224 px, batch 256, bf16 autocast, channels-last, eager and
  compiled: FLOPs per step = 3 × counted forward MACs × 2 × batch, divided by the step time and by
  the measured matmul rate.

``--dry-run`` runs every row on the CPU at tiny sizes, to prove the script end to end without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks import isolate, report, run_record, training
from benchmarks.training import Variant

BUDGET_S = 540  # the whole script must fit in 9 minutes on one H100/H200
RUNS_DIR = Path(__file__).parent / "runs"
DEFAULT_ARCHIVE = "../shared/datasets/cifar10-jpeg.tar.gz"
SAMPLE_ARCHIVE = "src/cnnlab/data/sample/cifar10-sample.tar.gz"


@dataclass
class Plan:
    """Sizes and commands for a run on the card, or for the CPU dry run."""

    device: str
    dataset: str  # a cnnlab dataset spec: folder:PATH
    matmul_size: int = 8192
    matmul_iters: int = 50
    mfu_width: int = 64
    mfu_image_size: int = 224
    mfu_batch: int = 256
    mfu_warmup: int = 10
    mfu_steps: int = 30
    mfu_compile: bool = True
    train_flags: dict[str, list[str]] = field(default_factory=dict)  # row → extra `cnnlab train` flags
    fast_long_epochs: int = 40
    fast_epochs: int | None = None  # None: the recipe's own

    def recipe_rows(self) -> dict[str, list[str]]:
        """Row name → the `cnnlab train` arguments it runs."""
        data = ["--dataset", self.dataset, "--val-split", "0"]
        rows = {
            "seed 20 epochs": ["--recipe", "seed", "--epochs", "20", *data],
            "fast": ["--recipe", "fast", *data, *(["--epochs", str(self.fast_epochs)] if self.fast_epochs else [])],
            f"fast {self.fast_long_epochs} epochs": ["--recipe", "fast", "--epochs", str(self.fast_long_epochs), *data],
            "airbench": ["--recipe", "airbench", *data],
        }
        return {name: args + self.train_flags.get(name.split()[0], []) for name, args in rows.items()}


def card_plan(dataset: str, fast_long_epochs: int) -> Plan:
    # Extra flags let a lever (say --compile) be tried without editing this file.
    flags = {recipe: shlex.split(os.environ.get(f"CNNLAB_BENCH_{recipe.upper()}_FLAGS", ""))
             for recipe in ("seed", "fast", "airbench")}
    return Plan(device="cuda", dataset=dataset, train_flags=flags, fast_long_epochs=fast_long_epochs)


def dry_plan(dataset: str) -> Plan:
    tiny = ["--device", "cpu", "--width", "4", "--limit-test", "128"]
    return Plan(device="cpu", dataset=dataset, matmul_size=256, matmul_iters=3, mfu_width=4, mfu_image_size=64,
                mfu_batch=8, mfu_warmup=1, mfu_steps=2, mfu_compile=os.environ.get("CNNLAB_BENCH_DRY_COMPILE") == "1",
                fast_epochs=2, fast_long_epochs=3,  # 1 epoch of 4 steps: OneCycleLR divides by zero
                train_flags={"seed": [*tiny, "--image-size", "32", "--limit-train", "128", "--epochs", "1"],
                             "fast": [*tiny, "--limit-train", "256", "--batch-size", "64"],
                             "airbench": [*tiny, "--limit-train", "256", "--batch-size", "64", "--epochs", "2",
                                          "--lookahead-from", "1", "--whiten-bias-epochs", "1"]})


# --- rows that run in a child process ---------------------------------------------------------------

class Timer:
    """Elapsed milliseconds of GPU work (CUDA events: no host overhead counted) or of CPU work."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "Timer":
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.begin.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def gpu_peak(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {"gpu_peak_mb": 0.0}
    return {"gpu_peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}


def matmul_row(plan: Plan) -> dict[str, Any]:
    """bf16 TFLOP/s of ``n×n @ n×n`` matmuls, the card's practical matrix rate."""
    device, n = torch.device(plan.device), plan.matmul_size
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):  # kernel selection, clocks ramping up
        torch.matmul(a, b, out=out)
    with Timer(device) as t:
        for _ in range(plan.matmul_iters):
            torch.matmul(a, b, out=out)
    tflops = 2 * n**3 * plan.matmul_iters / (t.ms / 1e3) / 1e12
    return {"value": tflops, "size": n, **gpu_peak(device)}


def mfu_row(plan: Plan, compiled: bool) -> dict[str, Any]:
    """Step time of resnet18 training (bf16 autocast, channels-last) on random inputs already on the device."""
    from cnnlab.models import build
    from cnnlab.models.summary import summarize

    device = torch.device(plan.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    macs = summarize("resnet18", image_size=plan.mfu_image_size, num_classes=10, width=plan.mfu_width)["macs"]
    model = build("resnet18", num_classes=10, width=plan.mfu_width).to(device, memory_format=torch.channels_last)
    variant = Variant("mfu", channels_last=True, compile=compiled, bf16=True)
    step = training.make_step(model, variant, device)
    x = torch.randn(plan.mfu_batch, 3, plan.mfu_image_size, plan.mfu_image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (plan.mfu_batch,), device=device)
    start = time.perf_counter()
    for _ in range(plan.mfu_warmup):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    with Timer(device) as t:
        for _ in range(plan.mfu_steps):
            step(x, y)
    step_s = t.ms / 1e3 / plan.mfu_steps
    flops = 3 * macs * 2 * plan.mfu_batch  # forward, and backward at twice the forward's cost
    return {"value": flops / step_s / 1e12, "step_ms": step_s * 1e3, "images_per_s": plan.mfu_batch / step_s,
            "forward_macs_per_image": macs, "warmup_s": warmup_s, **gpu_peak(device)}


def decode_row(plan: Plan) -> dict[str, Any]:
    """Seconds to load the dataset: decoding into the cache if it is not there yet, then from the cache."""
    from cnnlab.data import load_dataset
    from cnnlab.data.store import cache_dir

    folder = cache_dir() / "datasets"
    before = set(folder.glob("*.pt")) if folder.is_dir() else set()
    start = time.perf_counter()
    data = load_dataset(plan.dataset)
    first = time.perf_counter() - start
    start = time.perf_counter()
    load_dataset(plan.dataset)
    return {"value": first, "decoded": bool(set(folder.glob("*.pt")) - before),
            "cached_s": time.perf_counter() - start, "train": len(data.train_y), "test": len(data.test_y)}


def tta_row(plan: Plan, run_dir: str) -> dict[str, Any]:
    """Test accuracy of a finished run's final weights without horizontal-flip averaging, and with."""
    scores = run_record.final_scores(Path(run_dir), plan.device)
    return {"value": scores["plain"]["top1"], "tta_acc": scores["tta"]["top1"], **gpu_peak(torch.device(plan.device))}


def child_rows() -> dict:
    def plan_of(spec: dict[str, Any]) -> Plan:
        return Plan(**spec["plan"])

    return {
        "matmul": lambda spec: matmul_row(plan_of(spec)),
        "mfu": lambda spec: mfu_row(plan_of(spec), spec["compiled"]),
        "decode": lambda spec: decode_row(plan_of(spec)),
        "tta": lambda spec: tta_row(plan_of(spec), spec["run_dir"]),
    }


# --- rows that run `cnnlab train` ------------------------------------------------------------------------

def train_row(name: str, args: list[str], timeout_s: float) -> dict[str, Any]:
    """Wall time of ``python -m cnnlab train ARGS`` from start to exit, and the accuracy it reports."""
    run_dir = RUNS_DIR / name.replace(" ", "-")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume
    memory_file = run_dir.with_suffix(".memory.json")
    memory_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.train_run", str(memory_file), "train", *args, "--out", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": isolate.python_path()}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=isolate.REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout_s:.0f} s", "command": _shown(args)}
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit status {done.returncode}: {tail}", "command": _shown(args)}
    epochs = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r.get("kind") == "epoch"]
    config = json.loads((run_dir / "config.json").read_text())
    last = epochs[-1]
    return {"value": last["test_acc"], "wall_s": wall, "train_acc": last["train_acc"], "epochs": last["epoch"],
            "steps": last["step"], "training_s": sum(e["seconds"] for e in epochs),
            "device_name": config.get("device_name"), "run_dir": str(run_dir), "command": _shown(args),
            **json.loads(memory_file.read_text())}


def _shown(args: list[str]) -> str:
    return "python -m cnnlab train " + shlex.join(args)


# --- the whole run ------------------------------------------------------------------------------------

TARGETS = {  # row → (target text, test on the row); only the targets
    "seed 20 epochs": ("≥ 88% test in ≤ 180 s", lambda r: r["value"] >= 0.88 and r["wall_s"] <= 180),
    "fast": ("≥ 94% test in ≤ 20 s", lambda r: r["value"] >= 0.94 and r["wall_s"] <= 20),
    "long": ("≥ 95% test in ≤ 60 s", lambda r: r["value"] >= 0.95 and r["wall_s"] <= 60),
    "MFU": ("≥ 40% of the measured bf16 matmul rate", lambda r: r["mfu"] >= 0.40),
}


def _target_key(name: str) -> str | None:
    if name.startswith("MFU"):
        return "MFU"
    if name.startswith("fast ") and name.endswith("epochs"):
        return "long"
    return name if name in TARGETS else None


def run(plan: Plan, budget_s: float = BUDGET_S, progress=print) -> dict[str, Any]:
    started = time.perf_counter()
    machine = report.machine_info()
    rows: list[dict[str, Any]] = []
    job = {"plan": asdict(plan)}

    def left(cap: float) -> float:
        return max(min(cap, budget_s - (time.perf_counter() - started)), 1.0)

    def add(name: str, metric: str, result: dict[str, Any]) -> dict[str, Any]:
        row = {"name": name, "metric": metric, **result}
        key = _target_key(name)
        if key and "error" not in row and plan.device != "cpu":  # a dry run's numbers meet nothing
            row["target"], check = TARGETS[key]
            row["met"] = bool(check(row))
        rows.append(row)
        shown = row.get("error") or f"{row['value']:.4g} {metric}"
        progress(f"{name:24s} {shown}")
        return row

    matmul = add("bf16 matmul", "TFLOP/s", isolate.run("benchmarks.gpu", {**job, "section": "matmul"}, left(120)))
    add("decode", "s (first load)", isolate.run("benchmarks.gpu", {**job, "section": "decode"}, left(180)))
    caps = {"seed 20 epochs": 300.0, "fast": 90.0, "airbench": 90.0}  # seconds a row may take at most; the rest: 150
    for name, args in plan.recipe_rows().items():
        row = add(name, "test acc", train_row(name, args, left(caps.get(name, 150.0))))
        if name.startswith(("fast", "airbench")) and "error" not in row:
            add(f"{name}, no {'TTA' if name == 'airbench' else 'flip TTA'}", "test acc",
                isolate.run("benchmarks.gpu", {**job, "section": "tta", "run_dir": row["run_dir"]}, left(60)))
    for compiled in (False, True) if plan.mfu_compile else (False,):
        name = "MFU resnet18 compiled" if compiled else "MFU resnet18 eager"
        result = isolate.run("benchmarks.gpu", {**job, "section": "mfu", "compiled": compiled}, left(240))
        if "error" not in result and "error" not in matmul:
            result["mfu"] = result["value"] / matmul["value"]
        add(name, "model TFLOP/s", result)
    if not plan.mfu_compile:
        rows.append({"name": "MFU resnet18 compiled", "skipped": "compile is skipped in the dry run"})
    return {"benchmark": "gpu", "dry_run": plan.device == "cpu",
            "dataset": "CIFAR-10 (JPEG copy)" if "cifar10-jpeg" in plan.dataset else plan.dataset,
            "machine": machine, "plan": asdict(plan), "command": report.command_line(),
            "total_s": time.perf_counter() - started, "rows": rows}


COLUMNS = [("name", "row"), ("value", "value"), ("metric", "unit"), ("wall_s", "wall s"), ("mfu", "MFU"),
           ("gpu_peak_mb", "GPU peak MiB"), ("host_rss_peak_mb", "host peak MiB"), ("met", "target met")]


def table(document: dict[str, Any]) -> str:
    m = document["machine"]
    where = m.get("gpu", f"CPU dry run ({m['cpu']})")
    head = f"{document['dataset']}, {m['date']}, {where}, torch {m['torch']}, total {document['total_s']:.0f} s"
    shown = [{**r, "value": r.get("value", r.get("error") or r.get("skipped"))} for r in document["rows"]]
    return head + "\n\n" + report.format_table(shown, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", help=f"the CIFAR-10 JPEG archive (default {DEFAULT_ARCHIVE}; "
                                          f"the bundled sample in a dry run)")
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("CNNLAB_BENCH_DRY") == "1",
                        help="every row on the CPU at tiny sizes (also: CNNLAB_BENCH_DRY=1)")
    parser.add_argument("--fast-long-epochs", type=int,
                        default=int(os.environ.get("CNNLAB_BENCH_FAST_LONG_EPOCHS", 40)),
                        help="epochs of the longer fast row (aimed at ≥ 95%% in ≤ 60 s)")
    parser.add_argument("--out", type=Path, help="folder for the JSON (default benchmarks/results)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row in this process
    args = parser.parse_args(argv)
    if args.row:
        isolate.child_main(args.row, child_rows())
        return 0
    archive = args.dataset or (SAMPLE_ARCHIVE if args.dry_run else DEFAULT_ARCHIVE)
    dataset = f"folder:{Path(archive).resolve()}"
    if args.dry_run:
        plan = dry_plan(dataset)
    elif not torch.cuda.is_available():
        print("no CUDA GPU is visible; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    else:
        plan = card_plan(dataset, args.fast_long_epochs)
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    document = run(plan, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(document))
    date = document["machine"]["date"].replace("-", "")
    name = "gpu-dry-run.json" if args.dry_run else f"gpu-{date}.json"
    print(f"\nwritten {report.write_json(document, name, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
