"""CPU side by side: the assignment's way of feeding and training ResNet-18 against cnnlab's.

Two measurements, each row in a fresh Python process so that its peak memory is its own:

1. Input pipeline: normalised 224 px batches of 64 per second, the assignment's per-image PIL
   DataLoader (2 workers) against cnnlab's batched tensor pipeline (see :mod:`benchmarks.pipeline`).
2. Training: images per second of full SGD steps of ``resnet18-seed`` (the assignment's model, as
   the ``seed`` recipe trains it) at 224 px, batch 64, data included, for the assignment's way and
   for cnnlab with the levers that might help a CPU: channels-last, bf16 autocast, torch.compile,
   thread count (see :mod:`benchmarks.training`).

The machines this runs on are shared, so rows are interleaved rather than run in blocks: the
pipeline rows run in several rounds, alternating their order, and the training baseline runs both
first and last, so a change in background load shows up instead of skewing one side.

    python -m benchmarks.cpu            # about 10 minutes on 2 cores
    python -m benchmarks.cpu --quick    # about 2 minutes: fewer rounds, batches and variants

On a CPU without native bf16 (no ``avx512_bf16``/``amx_bf16``, or torch's kernels capped below
AVX-512) the bf16 rows are left out unless named with ``--variants``: torch emulates bf16 there, many
times slower than fp32 (one warm-up step of such a row took 245 s on an AVX2-only AMD EPYC). The JSON
and the table say which CPU, torch kernel capability and bf16 support the figures are for.

Prints a table and writes ``benchmarks/results/cpu-YYYYMMDD.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import isolate, pipeline, report, training
from benchmarks.training import Variant
from cnnlab.train.device import cpu_bf16, keep_freed_memory

DEFAULT_DATASET = os.environ.get("CNNLAB_CIFAR10_JPEG",
                                 str(isolate.REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"))

# "allocator": whether the row's process keeps freed memory in the heap as the trainer does on a CPU
# (cnnlab.train.device.keep_freed_memory); glibc's default unmaps every freed block above 32 MiB, so
# each 224 px batch (38 MiB) and every large activation is page-faulted in again, step after step.
PIPELINE_ROWS = {  # row name → (pipeline kind, allocator kept as the trainer keeps it)
    "assignment": ("assignment", False),
    "cnnlab": ("cnnlab", True),  # what the trainer does on a CPU
    "cnnlab default allocator": ("cnnlab", False),
    "cnnlab interpolate kernel": ("cnnlab-interpolate", True),  # cnnlab before the matrix-product resize
    "cnnlab resize first": ("cnnlab-resize-first", True),
    "cnnlab resize first, default allocator": ("cnnlab-resize-first", False),  # cnnlab's first version
    "cnnlab channels-last": ("cnnlab-channels-last", True),
}

VARIANTS = {v.name: v for v in (
    Variant("assignment", pipeline="assignment", keep_freed_memory=False),
    Variant("cnnlab"),  # what the trainer does on a CPU: fp32, default layout, eager
    Variant("cnnlab default allocator", keep_freed_memory=False),
    Variant("cnnlab channels-last", pipeline="cnnlab-channels-last", channels_last=True),
    Variant("cnnlab bf16", bf16=True),
    Variant("cnnlab channels-last bf16", pipeline="cnnlab-channels-last", channels_last=True, bf16=True),
    Variant("cnnlab compile", compile=True),
    Variant("cnnlab 1 thread", threads=1),
)}
SLOW_VARIANTS = ("cnnlab 1 thread",)  # only on request (--variants): half the cores, ~2× slower
BASELINE = "assignment"


@dataclass
class Settings:
    """Sizes of one benchmark run; the defaults are the full run on the real images."""

    dataset: str = f"folder:{DEFAULT_DATASET}"  # or "synthetic" (random pixels, for tests)
    model: str = "resnet18-seed"
    width: int = 64
    image_size: int = 224
    batch_size: int = 64
    pipeline_warmup: int = 5
    pipeline_batches: int = 40
    pipeline_rounds: int = 3
    pipelines: tuple[str, ...] = tuple(PIPELINE_ROWS)
    train_warmup: int = 1
    train_steps: int = 2
    variants: tuple[str, ...] = tuple(v for v in VARIANTS if v not in SLOW_VARIANTS)
    row_timeout_s: float = 900.0

    @classmethod
    def quick(cls, **changes: Any) -> "Settings":
        base = dict(pipeline_batches=20, pipeline_rounds=2, train_steps=1,
                    pipelines=("assignment", "cnnlab", "cnnlab resize first, default allocator"),
                    variants=("assignment", "cnnlab", "cnnlab bf16"))
        return cls(**{**base, **changes})


# --- one row, in whatever process runs it ---------------------------------------------------------

def load_images(settings: Settings, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` training images (uint8, N×3×32×32) and labels: a fixed random draw from the dataset."""
    if settings.dataset == "synthetic":
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=g),
                torch.randint(0, 10, (count,), generator=g))
    from cnnlab.data import load_dataset  # decodes once, then reads cnnlab's cache

    data = load_dataset(settings.dataset)
    pick = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))[:count]
    return data.train_x[pick].clone(), data.train_y[pick].clone()


def pipeline_row(name: str, settings: Settings) -> dict[str, Any]:
    """Batches per second of input pipeline ``name``; exactly one epoch's worth of images is loaded."""
    n = (settings.pipeline_warmup + settings.pipeline_batches) * settings.batch_size
    images, labels = load_images(settings, n)
    kind, allocator = PIPELINE_ROWS[name]
    if allocator:
        keep_freed_memory()
    stream = pipeline.batches(kind, images, labels, settings.image_size, settings.batch_size)
    result = pipeline.batches_per_second(stream, settings.pipeline_warmup, settings.pipeline_batches)
    del stream  # stops DataLoader workers, so their peak memory is counted as children's
    return result


def training_row(name: str, settings: Settings) -> dict[str, Any]:
    n = (settings.train_warmup + settings.train_steps) * settings.batch_size
    images, labels = load_images(settings, n)
    return training.measure(VARIANTS[name], images, labels, model_name=settings.model, width=settings.width,
                            image_size=settings.image_size, batch_size=settings.batch_size,
                            warmup=settings.train_warmup, steps=settings.train_steps)


ROWS = {"pipeline": pipeline_row, "training": training_row}


def run_row(section: str, name: str, settings: Settings, fresh_process: bool = True) -> dict[str, Any]:
    """Run one row, in a fresh process when ``fresh_process``; failures are recorded, not raised."""
    started = time.time()
    load = os.getloadavg()[0]
    if not fresh_process:
        result = ROWS[section](name, settings)
        result.update(report.peak_host_rss_mb())
    else:
        job = {"section": section, "name": name, "settings": dataclasses.asdict(settings)}
        result = isolate.run("benchmarks.cpu", job, settings.row_timeout_s)
    result.update(load_1min=round(load, 2), wall_s=round(time.time() - started, 1))
    return result


def _child_rows() -> dict:
    def row(section):
        def run_job(spec: dict[str, Any]) -> dict[str, Any]:
            settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["settings"].items()})
            return ROWS[section](spec["name"], settings)
        return run_job
    return {section: row(section) for section in ROWS}


# --- the whole benchmark --------------------------------------------------------------------------

def without_emulated_bf16(variants: tuple[str, ...], bf16_native: bool) -> tuple[tuple[str, ...], list[str]]:
    """(the rows to run, the bf16 rows left out): all of them on a CPU that runs bf16 natively."""
    if bf16_native:
        return variants, []
    return tuple(v for v in variants if not VARIANTS[v].bf16), [v for v in variants if VARIANTS[v].bf16]


def schedule(names: tuple[str, ...], rounds: int) -> list[str]:
    """Rows in rounds of alternating order (A B C, C B A, …) so that drifting load hits all of them."""
    order: list[str] = []
    for r in range(rounds):
        order += list(names) if r % 2 == 0 else list(reversed(names))
    return order


def summarise(name: str, runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """One table row from the runs of a row: median speed, highest memory, every run kept."""
    good = [r for r in runs if "error" not in r]
    row: dict[str, Any] = {"name": name, "runs": runs}
    if not good:
        row["error"] = runs[-1].get("error", "no run")
        return row
    row[key] = statistics.median(r[key] for r in good)
    for extra in ("batches_per_s", "images_per_s"):
        if extra != key and extra in good[0]:
            row[extra] = statistics.median(r[extra] for r in good)
    row["host_rss_peak_mb"] = max(r["host_rss_peak_mb"] for r in good)
    row["children_rss_peak_mb"] = max(r["children_rss_peak_mb"] for r in good)
    if "warmup_s" in good[0]:
        row["warmup_s"] = max(r["warmup_s"] for r in good)
    return row


def add_speedups(rows: list[dict[str, Any]], key: str, baseline: str) -> None:
    base = next((r.get(key) for r in rows if r["name"] == baseline), None)
    for row in rows:
        if base and row.get(key):
            row["speedup"] = row[key] / base


def run(settings: Settings, fresh_process: bool = True, progress=print) -> dict[str, Any]:
    """Every row of ``settings``; returns the JSON document (machine, settings, both tables)."""
    machine = report.machine_info()
    cpu = cpu_bf16()
    sections = {}
    plans = {
        "pipeline": (schedule(settings.pipelines, settings.pipeline_rounds), "batches_per_s", BASELINE),
        # The baseline first and last brackets the slow training rows against drifting load.
        "training": ([*settings.variants, BASELINE] if BASELINE in settings.variants and len(settings.variants) > 1
                     else list(settings.variants), "images_per_s", BASELINE),
    }
    for section, (order, key, baseline) in plans.items():
        runs: dict[str, list[dict[str, Any]]] = {}
        for name in order:
            result = run_row(section, name, settings, fresh_process)
            runs.setdefault(name, []).append(result)
            progress(f"{section:8s} {name:32s} " + (f"{result[key]:8.2f} {key}" if key in result
                                                      else result.get("error", "")))
        rows = [summarise(name, runs[name], key) for name in dict.fromkeys(order)]
        add_speedups(rows, key, baseline)
        sections[section] = rows
    return {
        "benchmark": "cpu",
        "dataset": "CIFAR-10 (JPEG copy)" if settings.dataset.startswith("folder:") else settings.dataset,
        "machine": machine,
        "cpu_bf16": cpu,  # torch's kernel capability and whether bf16 is native: what the bf16 rows mean
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "settings": dataclasses.asdict(settings),
        "command": report.command_line(),
        **sections,
        "variants": {name: VARIANTS[name].to_dict() for name in settings.variants},
    }


COLUMNS = {
    "pipeline": [("name", "input pipeline (224 px, batch 64)"), ("batches_per_s", "batches/s"),
                 ("images_per_s", "images/s"), ("speedup", "× assignment"),
                 ("host_rss_peak_mb", "peak RSS MiB"), ("children_rss_peak_mb", "children's peak MiB")],
    "training": [("name", "training (fp32 unless bf16)"), ("images_per_s", "images/s"),
                 ("speedup", "× assignment"), ("warmup_s", "warm-up s"),
                 ("host_rss_peak_mb", "peak RSS MiB"), ("children_rss_peak_mb", "children's peak MiB")],
}


def tables(document: dict[str, Any]) -> str:
    m = document["machine"]
    head = (f"{document['dataset']}, {m['date']}, {m['cpu']} ({m['cores']} cores), torch {m['torch']}, "
            f"load average {m['load_average'][0]} before / {document['load_average_after'][0]} after")
    cpu = document.get("cpu_bf16")
    if cpu:
        head += (f"\ntorch CPU kernels {cpu['capability']}, bf16 "
                 + ("native" if cpu["bf16_native"] else "not native (emulated: bf16 rows are many times slower)")
                 + (f" ({', '.join(cpu['bf16_flags'])})" if cpu["bf16_flags"] else "")
                 + (f", set by {cpu['set_by']}" if cpu.get("set_by") else ""))
    if document.get("skipped_bf16"):
        head += ("\nleft out (no native bf16; name them with --variants to run them): "
                 + ", ".join(document["skipped_bf16"]))
    body = [report.format_table([{**r, "name": r["name"] + (" (failed)" if "error" in r else "")}
                                 for r in document[s]], COLUMNS[s]) for s in COLUMNS if s in document]
    return "\n\n".join([head, *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, batches and variants (about 2 min)")
    parser.add_argument("--dataset", help=f"cnnlab dataset spec (default folder:{DEFAULT_DATASET})")
    parser.add_argument("--variants", nargs="+", metavar="NAME", choices=list(VARIANTS),
                        help="training rows to run (default: all but the 1-thread row)")
    parser.add_argument("--out", type=Path, help="folder for the JSON (default benchmarks/results)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args(argv)
    if args.row:
        isolate.child_main(args.row, _child_rows())
        return 0
    changes: dict[str, Any] = {"dataset": args.dataset} if args.dataset else {}
    if args.variants:
        changes["variants"] = tuple(dict.fromkeys([BASELINE, *args.variants]))
    settings = Settings.quick(**changes) if args.quick else Settings(**changes)
    skipped: list[str] = []
    if not args.variants:  # rows named on the command line run whatever the CPU
        variants, skipped = without_emulated_bf16(settings.variants, cpu_bf16()["bf16_native"])
        settings = dataclasses.replace(settings, variants=variants)
    if skipped:
        print(f"note: this CPU has no native bf16, so {', '.join(skipped)} are left out "
              "(name them with --variants to run them anyway)", file=sys.stderr)
    document = run(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    document["skipped_bf16"] = skipped
    document["mode"] = "quick" if args.quick else "full"
    print(tables(document))
    suffix = "-quick" if args.quick else ""
    path = report.write_json(document, f"cpu-{document['machine']['date'].replace('-', '')}{suffix}.json", args.out)
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
