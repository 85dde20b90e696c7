"""The degradation problem at CPU scale (He et al. 2015, Fig. 1, 4 and 6): deeper plain nets train worse,
deeper residual nets do not.

Trains the paper's CIFAR-10 nets plain20, plain56, resnet20 and resnet56 (Sec. 4.2: 3×3 convolutions on
32, 16 and 8 px maps, option-A shortcuts) with one budget and seed each, the paper's optimiser (SGD,
momentum 0.9, weight decay 1e-4, batch 128, learning rate 0.1, flips and 4-pixel shifts), a cosine
schedule over the budget instead of the paper's steps at 32k and 48k iterations, then writes the
``cnnlab compare`` page of the four runs and a JSON file, and says whether the paper's shape appeared:

- plain56 ends with a *higher* training error than plain20 (the degradation problem), and
- resnet56 ends with a *lower* training error than resnet20 (residual learning removes it).

    python -m benchmarks.degradation                        # the archive, width 16, 5 epochs: hours on 2 cores
    python -m benchmarks.degradation --width 8 --limit-train 10000   # a reduced budget, the same comparison
    python -m benchmarks.degradation --quick                # a dry run on the bundled sample (seconds)

The dataset is ``folder:$CNNLAB_CIFAR10_JPEG`` (a .tar.gz of train/<class>/*.jpg and test/<class>/*.jpg)
unless ``--dataset`` says otherwise; ``--quick`` uses the bundled sample. Results go to
``benchmarks/results/degradation-cpu-YYYYMMDD.{json,html}`` (``--quick``: a scratch folder).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import report

MODELS = ("plain20", "plain56", "resnet20", "resnet56")
# He et al. 2015, Sec. 4.2, at a CPU budget: the schedule is cosine over the run instead of their 64k iterations.
PAPER = dict(recipe="paper", image_size=32, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
             schedule="cosine", augment="flip-crop", label_smoothing=0.0, tta=False,
             mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
COLUMNS = [("model", "model"), ("train_error", "train error %"), ("test_error", "test error %"),
           ("params", "params"), ("macs", "MACs"), ("images_per_s", "images/s"), ("train_s", "train s")]


def shape(rows: dict[str, dict[str, Any]]) -> dict[str, bool | None]:
    """Whether the paper's result appeared: deeper plain nets train worse, deeper ResNets better."""
    def worse(deep: str, shallow: str) -> bool | None:
        if deep not in rows or shallow not in rows:
            return None
        return rows[deep]["train_error"] > rows[shallow]["train_error"]

    better = worse("resnet56", "resnet20")
    return {"plain56_trains_worse_than_plain20": worse("plain56", "plain20"),
            "resnet56_trains_better_than_resnet20": None if better is None else not better}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.degradation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", help="default: folder:$CNNLAB_CIFAR10_JPEG (--quick: the bundled sample)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--width", type=int, default=16, help="filters of the first stage (16 in the paper)")
    parser.add_argument("--limit-train", type=int, help="train on a random subset of N images (default: all)")
    parser.add_argument("--limit-test", type=int, help="test on a random subset of N images (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a dry run: the bundled sample, width 2, one step of 128 images, into a scratch folder")
    parser.add_argument("--out", type=Path, help="folder for the JSON and HTML (default benchmarks/results)")
    parser.add_argument("--runs", type=Path, default=Path(__file__).parent / "runs" / "degradation",
                        help="folder for the run folders (default benchmarks/runs/degradation)")
    args = parser.parse_args(argv)

    from cnnlab.config import resolve
    from cnnlab.report.compare import compare
    from cnnlab.train.engine import train

    if args.quick:
        args.dataset = args.dataset or "sample"
        args.width, args.epochs, args.limit_train, args.limit_test = 2, 1, 160, 64  # one step each
        args.out = args.out or args.runs / "quick"
    archive = os.environ.get("CNNLAB_CIFAR10_JPEG")
    if args.dataset is None:
        if not archive:
            parser.error("set CNNLAB_CIFAR10_JPEG to the CIFAR-10 JPEG archive, give --dataset, or use --quick")
        args.dataset = f"folder:{Path(archive).resolve()}"

    started = time.perf_counter()
    run_dirs, rows = [], {}
    for name in args.models:
        out = args.runs / name
        shutil.rmtree(out, ignore_errors=True)
        cfg = resolve(overrides={**PAPER, "model": name, "width": args.width, "dataset": args.dataset,
                                 "epochs": args.epochs, "limit_train": args.limit_train,
                                 "limit_test": args.limit_test, "seed": args.seed, "device": args.device,
                                 "out": str(out)})
        t = time.perf_counter()
        train(cfg)
        run_dirs.append(out)
        rows[name] = {"model": name, "train_s": time.perf_counter() - t}
        print(f"{name}: {rows[name]['train_s']:.0f} s", file=sys.stderr, flush=True)

    kind = "cuda" if args.device == "cuda" else "cpu"
    machine = report.machine_info()
    stem = f"degradation-{kind}-{machine['date'].replace('-', '')}"
    directory = args.out or report.RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    page, compared, _ = compare(run_dirs, out=directory / f"{stem}.html")
    for run in compared:
        row = run.row()
        name = run.config.model
        rows[name].update(train_error=100 * row["train_error"], test_error=100 * (1 - row["test_acc"]),
                          val_error=None if row["val_acc"] is None else 100 * (1 - row["val_acc"]),
                          params=row["params"], macs=row["macs"], images_per_s=row["images_per_s"],
                          curve=[{"epoch": r["epoch"], "train_error": 100 * (1 - r["train_acc"]),
                                  "test_error": 100 * (1 - r["test_acc"])} for r in run.epochs])
    verdict = shape(rows)
    document = {"benchmark": "degradation", "machine": machine, "dataset": args.dataset, "quick": args.quick,
                "settings": {**{k: v for k, v in PAPER.items() if k not in ("mean", "std")}, "width": args.width,
                             "epochs": args.epochs, "limit_train": args.limit_train, "limit_test": args.limit_test,
                             "seed": args.seed, "device": args.device},
                "command": report.command_line(), "total_s": time.perf_counter() - started,
                "shape": verdict, "rows": list(rows.values()), "page": str(page)}
    print(report.format_table(list(rows.values()), COLUMNS))
    for claim, seen in verdict.items():
        print(f"{claim.replace('_', ' ')}: {'yes' if seen else 'no' if seen is False else 'not measured'}")
    print(f"\nwritten {report.write_json(document, f'{stem}.json', directory)} and {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
