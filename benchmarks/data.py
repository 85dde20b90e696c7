"""Data beyond the memory: building the pixel cache, and training from it under a memory cap.

Four measurements, the slow ones each in a fresh Python process so that its peak memory is its own:

1. Decoders: 256 px JPEGs to 224 px uint8 arrays, one thread: PIL's decoder and resize, PIL's
   decoder and torch's antialiased resize (what the cache build does), torchvision.io's decoder
   and torch's resize.
2. Cache build against ``torchvision.datasets.ImageFolder`` with a ``DataLoader`` (2 workers)
   decoding one epoch of the same folder at the same size (Resize and CenterCrop to 224 px), in the
   order ImageFolder, build, build, ImageFolder (the machines this runs on are shared: a change in
   background load then shows in both); each build starts from an empty cache.
3. Training a small model on a synthetic folder larger than a memory cap: 20,000 JPEGs of 256 px
   stored at 224 px (2.9 GB decoded) against 2 GiB, in a memory cgroup of that limit where the
   machine lets us make one (cgroup v2 or v1, as root), the cache built in the same cgroup before.
   The run trains on a random ``--capped-images`` of the images (read at random from the whole
   file) to keep the benchmark short; its peak RSS and the cgroup's peak usage (page cache
   included, which the kernel trims to the cap) are recorded.
4. Images per second of SGD steps of the ``fast`` recipe's model (width 16, 32 px, batch 512,
   flip-and-crop) on the bundled sample, the batches of one step from memory and of the next from
   the cache, alternating in one process so that a change in load falls on both; the first epoch
   is left out as warm-up.

    python -m benchmarks.data                         # about 5 minutes on 2 idle cores
    python -m benchmarks.data --images 2000 --cap-gib 1 --epochs 2   # a quick look

Prints a table and writes ``benchmarks/results/data-YYYYMMDD.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import isolate, report

CLASSES = 10


@dataclass
class Settings:
    images: int = 20_000
    side: int = 256  # of the JPEGs
    store_size: int = 224
    cap_gib: float = 2.0
    train_image_size: int = 32  # the network's input when training from the large folder
    width: int = 8
    batch_size: int = 64
    decoder_images: int = 200
    capped_images: int = 2000  # trained on in measurement 3
    speed_epochs: int = 3  # of measurement 4, the first of them warm-up
    speed_limit_train: int | None = None  # of the sample, for quick runs
    work: str | None = None  # where the folder and the cache go (default: a temporary folder)
    parts: tuple[str, ...] = ("decoders", "compare", "capped", "speed")  # which measurements (1, 2, 3, 4)


# --- 1. decoders ---------------------------------------------------------------------------------


def _jpeg(seed: int, side: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (side, side), Image.Resampling.BICUBIC)
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (side, side, 3))  # texture, as in photos
    buf = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def decoders(s: Settings) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageOps

    from cnnlab.core import images

    torch.set_num_threads(1)
    files = [_jpeg(i, s.side) for i in range(s.decoder_images)]
    size = s.store_size

    def pil(data: bytes) -> None:
        with Image.open(io.BytesIO(data)) as img:
            np.asarray(ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BILINEAR))

    def cnnlab(data: bytes) -> None:
        images.decode(data, 3, fit=(size, size))

    def torchvision_io(data: bytes) -> None:
        import warnings

        from torchvision.io import decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation notice, once per call
            x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        F.interpolate(x[None].contiguous(memory_format=torch.channels_last), size=(size, size), mode="bilinear",
                      antialias=True)

    rows = []
    for name, fn in (("PIL decode + PIL resize (ImageOps.fit)", pil),
                     ("PIL decode + torch antialiased resize (cnnlab)", cnnlab),
                     ("torchvision.io decode_jpeg + torch resize", torchvision_io)):
        fn(files[0])
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            for data in files:
                fn(data)
            runs.append(len(files) / (time.perf_counter() - start))
        rows.append({"name": name, "images_per_s": statistics.median(runs), "runs": runs})
    return rows


# --- the synthetic folder ------------------------------------------------------------------------


def _write_some(args: tuple[str, int, int, int]) -> None:
    root, first, last, side = args
    for i in range(first, last):
        split = "test" if i % 20 == 0 else "train"  # 5 % of the images
        folder = Path(root, split, f"class{i % CLASSES}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(_jpeg(i, side))


def make_folder(root: Path, s: Settings) -> dict[str, Any]:
    start = time.perf_counter()
    step = max(1, s.images // 16)
    if len(list(root.rglob("*.jpg"))) != s.images:  # a --work folder from an earlier run is used as it is
        shutil.rmtree(root, ignore_errors=True)
        with multiprocessing.get_context("fork").Pool(2) as pool:
            pool.map(_write_some, [(str(root), a, min(a + step, s.images), s.side) for a in range(0, s.images, step)])
    size = sum(p.stat().st_size for p in root.rglob("*.jpg"))
    return {"images": s.images, "side": s.side, "jpeg_mb": size / 2**20, "seconds": time.perf_counter() - start,
            "decoded_mb": s.images * 3 * s.store_size**2 / 2**20}


# --- rows in fresh processes ---------------------------------------------------------------------


def row_imagefolder(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torchvision import datasets, transforms

    torch.set_num_threads(1)
    size = job["store_size"]
    folder = datasets.ImageFolder(str(Path(job["root"]) / "train"), transform=transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()]))
    loader = torch.utils.data.DataLoader(folder, batch_size=64, num_workers=2)
    start, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def row_build(job: dict[str, Any]) -> dict[str, Any]:
    from cnnlab.data import open_dataset

    start = time.perf_counter()
    data = open_dataset(f"folder:{job['root']}", store_size=job["store_size"])
    seconds = time.perf_counter() - start
    n = len(data.train_y) + len(data.test_y)
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds,
            "stored": list(data.train_x.shape[1:])}


def row_train(job: dict[str, Any]) -> dict[str, Any]:
    from cnnlab.config import resolve
    from cnnlab.data.store import memory_budget_bytes
    from cnnlab.train import engine

    cfg = resolve(overrides=job["config"])
    start = time.perf_counter()
    engine.train(cfg)
    seconds = time.perf_counter() - start
    run = Path(cfg.out)
    epochs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    info = json.loads((run / "config.json").read_text())["data"]
    return {"seconds": seconds, "images_per_s": epochs[-1]["images_per_s"], "on_device": info["on_device"],
            "train": info["train"], "stored": info["stored_size"], "test_acc": epochs[-1]["test_acc"],
            "budget_mb": memory_budget_bytes() / 2**20}


def row_speed(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from cnnlab.config import resolve
    from cnnlab.core.spec import Preprocess
    from cnnlab.data import open_dataset
    from cnnlab.data.loader import TrainBatches, place
    from cnnlab.data.splits import split
    from cnnlab.models import build
    from cnnlab.train.device import keep_freed_memory

    keep_freed_memory()  # as the trainer does on a CPU
    cfg = resolve(overrides=dict(recipe="fast", dataset="sample", width=job.get("width", 16), device="cpu"))
    data = split(open_dataset("sample", image_size=cfg.image_size), job.get("limit_train"))
    cpu = torch.device("cpu")
    preprocess = Preprocess(cfg.image_size, 3, cfg.mean, cfg.std)
    sources = {"memory": place(data, cpu, on_device=True), "cache": place(data, cpu, on_device=False)}
    assert isinstance(sources["memory"].train_x, torch.Tensor)
    assert not isinstance(sources["cache"].train_x, torch.Tensor)
    batches = {k: TrainBatches(d.train_x, d.train_y, cfg.batch_size, preprocess, cfg.augment, cfg.seed)
               for k, d in sources.items()}
    model = build(cfg.model, num_classes=10, width=cfg.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    seconds, images = {"memory": 0.0, "cache": 0.0}, {"memory": 0, "cache": 0}
    for epoch in range(job["epochs"]):
        streams = {k: b.epoch(epoch) for k, b in batches.items()}
        for i in range(len(batches["memory"])):
            for name in ("memory", "cache") if i % 2 == 0 else ("cache", "memory"):
                start = time.perf_counter()
                x, y, _ = next(streams[name])  # the batch's reading and augmentation are part of the step
                loss = criterion(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if epoch > 0:
                    seconds[name] += time.perf_counter() - start
                    images[name] += len(y)
    rates = {k: images[k] / seconds[k] for k in seconds}
    return {"memory_images_per_s": rates["memory"], "cache_images_per_s": rates["cache"],
            "ratio": rates["cache"] / rates["memory"], "train_images": len(data.train_y),
            "timed_epochs": job["epochs"] - 1}


ROWS = {"imagefolder": row_imagefolder, "build": row_build, "train": row_train, "speed": row_speed}


class Cap:
    """A memory cgroup with a limit, when this machine lets us make one (cgroup v2 or v1, as root)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit, self.folder, self.kind = limit_bytes, None, None
        name = f"cnnlab-bench-{os.getpid()}-{time.monotonic_ns()}"
        candidates = [("v2", Path("/sys/fs/cgroup") / name, "memory.max"),
                      ("v1", Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes")]
        for kind, folder, limit_file in candidates:
            if kind == "v2" and "memory" not in _read(Path("/sys/fs/cgroup/cgroup.controllers")).split():
                continue
            try:
                folder.mkdir()
                (folder / limit_file).write_text(str(limit_bytes))
                if kind == "v1":
                    (folder / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes)) if (
                        folder / "memory.memsw.limit_in_bytes").exists() else None
            except OSError:
                if folder.is_dir():
                    folder.rmdir()
                continue
            self.folder, self.kind = folder, kind
            return

    @property
    def enforced(self) -> bool:
        return self.folder is not None

    def join(self) -> None:  # in the child, before it runs anything
        if self.folder is not None:
            (self.folder / "cgroup.procs").write_text(str(os.getpid()))

    def peak_mb(self) -> float | None:
        if self.folder is None:
            return None
        text = _read(self.folder / ("memory.peak" if self.kind == "v2" else "memory.max_usage_in_bytes"))
        return int(text) / 2**20 if text.strip().isdigit() else None

    def oom_kills(self) -> int | None:
        if self.folder is None:
            return None
        for line in _read(self.folder / ("memory.events" if self.kind == "v2" else "memory.oom_control")).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def remove(self) -> None:
        if self.folder is not None:
            try:
                self.folder.rmdir()
            except OSError:
                pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def run_row(job: dict[str, Any], timeout_s: float, cap_bytes: int | None = None) -> dict[str, Any]:
    """``python -m benchmarks.data --row JOB`` in a fresh process, inside a fresh capped cgroup if asked."""
    cap = Cap(cap_bytes) if cap_bytes else None
    env = {**os.environ, "PYTHONPATH": isolate.python_path(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    env = {k: v for k, v in env.items() if v != ""}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.data", "--row", json.dumps(job)], cwd=isolate.REPO,
                              env=env, capture_output=True, text=True, timeout=timeout_s,
                              preexec_fn=cap.join if cap is not None and cap.enforced else None)
        result = next((json.loads(line[len(isolate.MARK):]) for line in reversed(done.stdout.splitlines())
                       if line.startswith(isolate.MARK)), None)
        if result is None:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            result = {"error": f"exit status {done.returncode}: {tail}"}
    except subprocess.TimeoutExpired:
        result = {"error": f"did not finish within {timeout_s:.0f} s"}
    result["wall_s"] = time.perf_counter() - start
    if cap is not None:
        result.update(cap_mb=cap.limit / 2**20, cap_enforced=f"cgroup {cap.kind}" if cap.enforced else "no",
                      cgroup_peak_mb=cap.peak_mb(), oom_kills=cap.oom_kills())
        cap.remove()
    return result


# --- the whole benchmark -------------------------------------------------------------------------


def run(s: Settings, progress=print) -> dict[str, Any]:
    work = Path(s.work) if s.work else Path(tempfile.mkdtemp(prefix="cnnlab-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "runs", ignore_errors=True)  # a --work folder's runs of an earlier call
    os.environ["CNNLAB_CACHE"] = str(work / "cache")  # the rows inherit it: a fresh cache
    document: dict[str, Any] = {"machine": report.machine_info(), "settings": asdict(s)}
    try:
        if "decoders" in s.parts:
            progress("decoders …")
            document["decoders"] = decoders(s)
        progress(f"writing {s.images:,} JPEGs of {s.side} px …")
        root = work / "folder"
        document["folder"] = make_folder(root, s)
        cap = int(s.cap_gib * 2**30)
        builds, folders = [], []
        for i, kind in enumerate(("imagefolder", "build", "build", "imagefolder") if "compare" in s.parts else ()):
            progress(f"{'ImageFolder + DataLoader (2 workers), one epoch' if kind == 'imagefolder' else 'cache build'}"
                     f" ({i + 1}/4) …")
            if kind == "build":
                shutil.rmtree(work / "cache" / "datasets", ignore_errors=True)
            row = run_row({"section": kind, "root": str(root), "store_size": s.store_size}, 1800)
            (builds if kind == "build" else folders).append(row)
        document["imagefolder"], document["build"] = folders, builds
        cap = int(s.cap_gib * 2**30)
        big = dict(recipe="fast", dataset=f"folder:{root}", store_size=s.store_size, image_size=s.train_image_size,
                   model="resnet18-cifar", width=s.width, epochs=1, batch_size=s.batch_size, lr=0.1, val_split=0,
                   limit_train=s.capped_images, limit_test=200, device="cpu", out=str(work / "runs" / "big"))
        if "capped" in s.parts:
            progress(f"cache build under a {s.cap_gib:g} GiB cap …")
            shutil.rmtree(work / "cache" / "datasets", ignore_errors=True)
            document["capped_build"] = run_row({"section": "build", "root": str(root), "store_size": s.store_size},
                                               1800, cap)
            progress(f"training from the cache under a {s.cap_gib:g} GiB cap …")
            document["capped_train"] = run_row({"section": "train", "config": big}, 1800, cap)
        if "speed" in s.parts:
            progress("sample: steps from memory and from the cache, alternating …")
            document["speed"] = run_row({"section": "speed", "epochs": s.speed_epochs,
                                         "limit_train": s.speed_limit_train}, 1800)
    finally:
        if not s.work:
            shutil.rmtree(work, ignore_errors=True)
    return summarise(document)


def summarise(d: dict[str, Any]) -> dict[str, Any]:
    def median(rows: list[dict[str, Any]]) -> float | None:
        rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
        return statistics.median(rates) if rates else None

    build, folder = median(d.get("build", [])), median(d.get("imagefolder", []))
    capped = [d.get("capped_build", {}), d.get("capped_train", {})]
    d.setdefault("speed", {})
    peak = max((r.get("host_rss_peak_mb", 0) for r in capped), default=0) or None
    d["summary"] = {
        "cache_over_memory_images_per_s": d.get("speed", {}).get("ratio"),
        "build_images_per_s": build, "imagefolder_images_per_s": folder,
        "build_over_imagefolder": build / folder if build and folder else None,
        "peak_rss_mb": peak, "cap_mb": d.get("capped_train", {}).get("cap_mb"),
        "peak_rss_under_cap": peak < d["capped_train"]["cap_mb"] if peak and "cap_mb" in d.get("capped_train", {})
        else None,
    }
    return d


def tables(d: dict[str, Any]) -> str:
    m, s = d["machine"], d["summary"]
    lines = [f"{m['date']}  {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load {m['load_average']}", ""]
    lines.append(report.format_table(d.get("decoders", []), [("name", "decoder, 256 → 224 px, 1 thread"),
                                                     ("images_per_s", "images/s")]))
    f = d["folder"]
    lines += ["", f"folder: {f['images']:,} JPEGs of {f['side']} px ({f['jpeg_mb']:,.0f} MiB), "
                  f"{f['decoded_mb']:,.0f} MiB decoded at {d['settings']['store_size']} px", ""]
    rows = ([dict(name="ImageFolder + DataLoader (2 workers), one epoch", **r) for r in d.get("imagefolder", [])[:1]]
            + [dict(name="cnnlab cache build (hash, probe, decode, resize, write)", **r) for r in d.get("build", [])]
            + [dict(name="ImageFolder + DataLoader (2 workers), one epoch", **r) for r in d.get("imagefolder", [])[1:]]
            + [dict(name="cnnlab cache build, capped", **d.get("capped_build", {})),
               dict(name="training from the cache, capped (width 8, 32 px)", **d.get("capped_train", {}))])
    lines.append(report.format_table(rows, [("name", "run"), ("images", "images"), ("seconds", "s"),
                                            ("images_per_s", "images/s"), ("host_rss_peak_mb", "peak RSS MiB"),
                                            ("children_rss_peak_mb", "largest child MiB"),
                                            ("cgroup_peak_mb", "cgroup peak MiB"), ("cap_mb", "cap MiB"),
                                            ("cap_enforced", "cap"), ("on_device", "on device"),
                                            ("error", "error")]))
    sp = d["speed"]
    lines += ["", f"sample, fast recipe at width 16: {_fmt(sp.get('memory_images_per_s'))} images/s from memory, "
                  f"{_fmt(sp.get('cache_images_per_s'))} from the cache {sp.get('error', '')}"]
    lines += ["", f"cache / memory images/s: {_fmt(s['cache_over_memory_images_per_s'])}; "
                  f"build / ImageFolder speed: {_fmt(s['build_over_imagefolder'])}; "
                  f"peak RSS {_fmt(s['peak_rss_mb'])} MiB, under the cap: {s['peak_rss_under_cap']}"]
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.3g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=Settings.images)
    parser.add_argument("--cap-gib", type=float, default=Settings.cap_gib)
    parser.add_argument("--epochs", type=int, default=Settings.speed_epochs,
                        help="of the sample in measurement 4, the first one warm-up")
    parser.add_argument("--capped-images", type=int, default=Settings.capped_images,
                        help="trained on under the cap in measurement 3")
    parser.add_argument("--speed-limit-train", type=int, help="train on this many sample images in measurement 4")
    parser.add_argument("--parts", default=",".join(Settings.parts),
                        help="which measurements, comma-separated: decoders, compare, capped, speed (default: all)")
    parser.add_argument("--work", help="keep the folder, cache and runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.row:
        isolate.child_main(args.row, ROWS)
        return
    settings = Settings(images=args.images, cap_gib=args.cap_gib, speed_epochs=args.epochs, work=args.work,
                        capped_images=args.capped_images,
                        parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()),
                        speed_limit_train=args.speed_limit_train)
    document = run(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(tables(document))
    path = report.write_json(document, f"data-{document['machine']['date'].replace('-', '')}.json")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
