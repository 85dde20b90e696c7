"""glibc's handling of freed memory and the speed of a CPU training step: airbench94's loop, side by side.

By default glibc hands every freed block above its mmap threshold (at most 32 MiB, adapted at run time)
back to the system, so the next step faults the same memory in again page by page; at batch 1,024 one
activation of airbench94's first group is 268 MB. cnnlab's trainer keeps blocks up to 1 GiB in the heap
(:func:`cnnlab.train.device.keep_freed_memory`). This times the same training steps (the anchor's loop,
:mod:`benchmarks.airbench_anchor`: forward, summed label-smoothed loss, backward, Nesterov SGD) in fresh
processes, one with glibc's defaults and one with cnnlab's setting, alternating, on random images (the
arithmetic does not depend on the pixels).

    python -m benchmarks.allocator                  # 6 steps a process, 2 rounds, batch 1024
    python -m benchmarks.allocator --steps 2 --rounds 1 --batch 256   # a dry run

The first step of each process (allocating everything once) is reported apart from the mean of the
others. Writes ``benchmarks/results/allocator-cpu-YYYYMMDD.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks import report

SETTINGS = ("glibc default", "keep freed memory")


def child(setting: str, steps: int, batch: int) -> dict[str, Any]:
    """Time ``steps`` training steps in this process under ``setting``."""
    import torch
    from torch import nn

    from benchmarks import airbench_anchor as anchor
    from cnnlab.core.spec import Preprocess
    from cnnlab.train.device import keep_freed_memory

    if setting == SETTINGS[1]:
        keep_freed_memory()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch * steps, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch * steps,))
    prepare = Preprocess(32, 3, anchor.MEAN, anchor.STD).to_input
    model = anchor.make_net(anchor.HYP["width"], images, prepare)
    opt = anchor.optimiser(model, batch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=anchor.HYP["label_smoothing"], reduction="none")
    loader = anchor.Loader(images, labels, batch, prepare, torch.device("cpu"))
    seconds = []
    for x, y in loader.epoch(0):
        tick = time.perf_counter()
        anchor.train_step(model, opt, loss_fn, x, y)
        seconds.append(time.perf_counter() - tick)
    return {"setting": setting, "seconds": seconds, "peak_rss_mb": report.peak_host_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.allocator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help="folder for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is reported apart")
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch)))
        return 0
    runs = []
    for _ in range(args.rounds):
        for setting in SETTINGS:
            done = subprocess.run([sys.executable, "-m", "benchmarks.allocator", "--child", setting, "--steps",
                                   str(args.steps), "--batch", str(args.batch)], capture_output=True, text=True,
                                  check=True)
            runs.append(json.loads(done.stdout.splitlines()[-1]))
    rows = []
    for setting in SETTINGS:
        mine = [r for r in runs if r["setting"] == setting]
        later = [s for r in mine for s in r["seconds"][1:]]
        step = statistics.mean(later)
        rows.append({"setting": setting, "first_s": round(statistics.mean(r["seconds"][0] for r in mine), 2),
                     "step_s": round(step, 3), "images_per_s": round(args.batch / step, 1),
                     "peak_rss_mb": max(r["peak_rss_mb"]["host_rss_peak_mb"] for r in mine)})
    rows[0]["speedup"], rows[1]["speedup"] = 1.0, round(rows[0]["step_s"] / rows[1]["step_s"], 2)
    print(report.format_table(rows, [("setting", "setting"), ("first_s", "first step s"), ("step_s", "later steps s"),
                                     ("images_per_s", "images/s"), ("peak_rss_mb", "peak RSS MB"),
                                     ("speedup", "speed-up")]))
    machine = report.machine_info()
    document = {"benchmark": "allocator", "machine": machine, "command": report.command_line(), "model": "airbench94",
                "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "rows": rows, "runs": runs}
    name = f"allocator-cpu-{machine['date'].replace('-', '')}.json"
    print(f"written {report.write_json(document, name, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
