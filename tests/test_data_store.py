"""The pixel cache: memory-mapped training with bounded memory, crash-safe and checked builds, stored sizes."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.config import resolve
from cnnlab.core import checkpoint
from cnnlab.core.errors import UserError
from cnnlab.core.spec import Preprocess
from cnnlab.data import load_dataset, open_dataset, store
from cnnlab.data.loader import TrainBatches
from cnnlab.train import engine

REPO = Path(__file__).resolve().parents[1]
TINY = dict(recipe="fast", dataset="sample", model="resnet18-cifar", width=4, image_size=16, epochs=1,
            batch_size=64, lr=0.1, limit_train=224, limit_test=32, val_split=32, device="cpu", seed=2)


def _smooth(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A photo-like image (smooth, so it compresses and decodes like one), quick to make."""
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BILINEAR)


def _jpeg_tree(root: Path, counts: dict[str, int], size: tuple[int, int], classes=("a", "b")) -> Path:
    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for i in range(n):
            folder = root / split / classes[i % len(classes)]
            folder.mkdir(parents=True, exist_ok=True)
            _smooth(rng, size).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def _state(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]


# --- training from the memory map ----------------------------------------------------------------


def test_reading_batches_from_the_cache_trains_exactly_as_holding_the_data(tmp_path: Path) -> None:
    held = engine.train(resolve(overrides={**TINY, "augment": "flip-crop", "data_on_device": True,
                                           "out": str(tmp_path / "held")})).run_dir
    streamed = tmp_path / "streamed"
    cfg = resolve(overrides={**TINY, "augment": "flip-crop", "data_on_device": False, "out": str(streamed)})
    engine.train(cfg, stop_after=2)  # and the (seed, epoch) order survives a resume from the cache
    engine.train(resume=streamed)
    assert json.loads((streamed / "config.json").read_text())["data"]["on_device"] is False
    assert json.loads((held / "config.json").read_text())["data"]["on_device"] is True
    a, b = _state(held), _state(streamed)
    assert all(torch.equal(a[k], b[k]) for k in a)

    def lines(d):
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
                for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert lines(held) == lines(streamed)


def test_each_rank_reads_only_its_share_of_each_batch(tmp_path: Path, monkeypatch) -> None:
    data = open_dataset("sample")
    images, labels = data.train_x.subset(torch.arange(100)), data.train_y[:100]
    prep = Preprocess(32, 3)
    whole = [(x, y) for x, y, _ in TrainBatches(images.read(), labels, 32, prep, "flip-crop", seed=4).epoch(1)]
    read: list[list[int]] = [[], []]
    original = store._File.read

    def spy(self, rows, out):
        read[rank].extend(np.arange(self.shape[0])[rows].tolist())
        return original(self, rows, out)

    monkeypatch.setattr(store._File, "read", spy)
    parts = []
    for rank in (0, 1):
        parts.append([(x, y) for x, y, _ in TrainBatches(images, labels, 32, prep, "flip-crop", 4, rank=rank,
                                                         world=2).epoch(1)])
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert len(read[0]) + len(read[1]) == 100 and not set(read[0]) & set(read[1])


def test_a_dataset_larger_than_the_memory_budget_trains_within_it(tmp_path: Path) -> None:
    # 1,700 images of 3×256×256: 334 MB decoded, against a budget of 150 MB set for the run. The
    # process first trains once on the sample so that every import and allocator pool is in place,
    # then resets its peak (clear_refs 5) and measures what the large run adds to it. Small batches:
    # the float copies the input pipeline makes of each batch (4 bytes a pixel) are not the store's.
    root = _jpeg_tree(tmp_path / "big", {"train": 1680, "test": 20}, (256, 256))
    decoded = 1700 * 3 * 256 * 256
    budget = 150 * 2**20
    script = textwrap.dedent(f"""
        import json, torch
        from cnnlab.config import resolve
        from cnnlab.data import loader
        from cnnlab.train import engine
        torch.set_num_threads(1)

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

        small = dict(recipe="fast", model="resnet18-cifar", width=4, image_size=16, epochs=1, batch_size=8,
                     lr=0.05, device="cpu", val_split=0)
        engine.train(resolve(overrides=dict(small, dataset="sample", limit_train=256, limit_test=40,
                                            out={str(tmp_path / "warm")!r})))
        loader.memory_budget_bytes = lambda: {budget}  # the budget set for this run
        baseline = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak resident memory starts again from here
        engine.train(resolve(overrides=dict(small, dataset="folder:{root}", store_size=256,
                                            out={str(tmp_path / "big-run")!r})))
        print(json.dumps({{"baseline": baseline, "peak": status("VmHWM")}}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    info = json.loads((tmp_path / "big-run" / "config.json").read_text())["data"]
    assert info["on_device"] is False and info["stored_size"] == [3, 256, 256] and info["train"] == 1680
    grown = rss["peak"] - rss["baseline"]
    assert decoded > 2 * budget and grown < budget, (grown / 2**20, decoded / 2**20)


# --- the cache is never half-written or damaged when it is read ----------------------------------


def test_kill_9_during_a_build_leaves_nothing_a_later_run_would_use(tmp_path: Path, monkeypatch) -> None:
    root = _jpeg_tree(tmp_path / "tree", {"train": 200, "test": 20}, (48, 48))
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import time
        from cnnlab.core import images
        from cnnlab.data import open_dataset
        from cnnlab.data.readers import pool
        pool.POOL_CHUNK = 10  # small chunks, each one slowed down: the kill lands mid-build
        decode = images.decode
        def slow(*args, **kwargs):
            time.sleep(0.02)
            return decode(*args, **kwargs)
        images.decode = slow
        open_dataset("folder:{root}")
    """)
    env = {**os.environ, "CNNLAB_CACHE": str(cache), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    datasets = cache / "datasets"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        partial = [p for p in datasets.glob(".*.tmp/train.u8") if p.stat().st_size > 0] if datasets.is_dir() else []
        if partial or proc.poll() is not None:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert partial and not [p for p in datasets.iterdir() if p.is_dir() and not p.name.startswith(".")]

    monkeypatch.setenv("CNNLAB_CACHE", str(cache))
    data = load_dataset(f"folder:{root}")
    assert not list(datasets.glob(".*.tmp"))  # the dead build's folder is gone
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "fresh"))
    clean = load_dataset(f"folder:{root}")
    assert torch.equal(data.train_x, clean.train_x) and torch.equal(data.test_y, clean.test_y)


@pytest.mark.parametrize("fill", [0.5, 1.0])
def test_a_disk_that_fills_up_during_a_build_gets_one_line_and_leaves_no_partial_entry(tmp_path, monkeypatch, fill):
    # A disk of a fixed size shared by the entry's files: a write stops where it is full, the next one
    # fails, as do the buffered bytes a file still holds when it is closed. It fills halfway through the
    # pixels, or with the last bytes of the entry (while its files are flushed and closed).
    root = _jpeg_tree(tmp_path / "tree", {"train": 300, "test": 10}, (16, 16))
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "roomy"))
    reference = load_dataset(f"folder:{root}")
    (entry,) = [p for p in (tmp_path / "roomy" / "datasets").iterdir() if p.is_dir()]
    data_bytes = sum(p.stat().st_size for p in entry.iterdir() if p.suffix in (".u8", ".labels"))
    free = [int(data_bytes * fill) - 1]

    class FillingFile(io.FileIO):
        def write(self, data) -> int:  # as a disk does: what fits, then ENOSPC
            data = memoryview(data).cast("B")
            if data.nbytes and not free[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written = super().write(data[:free[0]])
            free[0] -= written
            return written

    def open_on_small_disk(path, mode="r", *args, **kwargs):  # the files the entry is written to
        return io.BufferedWriter(FillingFile(path, "w")) if mode == "wb" else open(path, mode, *args, **kwargs)

    cache = tmp_path / "small"
    monkeypatch.setenv("CNNLAB_CACHE", str(cache))
    monkeypatch.setattr(store, "open", open_on_small_disk, raising=False)
    with pytest.raises(UserError) as raised:
        load_dataset(f"folder:{root}")
    message = str(raised.value)
    assert message == (f"cannot write the dataset cache in {cache / 'datasets'} (No space left on device); free some "
                       "space there, or set the environment variable CNNLAB_CACHE to a folder on a disk with room")
    assert free[0] == 0  # the build wrote all that fitted before it failed
    assert not [p.name for p in (cache / "datasets").iterdir() if p.is_dir()]  # no partial entry is left
    monkeypatch.undo()  # space freed: the next build completes
    monkeypatch.setenv("CNNLAB_CACHE", str(cache))
    again = load_dataset(f"folder:{root}")
    assert torch.equal(again.train_x, reference.train_x) and torch.equal(again.train_y, reference.train_y)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "labels", "no index"])
def test_a_damaged_cache_entry_is_rebuilt_with_a_message(tmp_path: Path, monkeypatch, caplog, damage: str) -> None:
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    root = _jpeg_tree(tmp_path / "tree", {"train": 6, "test": 2}, (12, 12))
    first = load_dataset(f"folder:{root}")
    (entry,) = [p for p in (tmp_path / "cache" / "datasets").iterdir() if p.is_dir()]
    pixels = entry / "train.u8"
    if damage == "truncated":
        os.truncate(pixels, pixels.stat().st_size - 100)
    elif damage == "flipped byte":
        raw = bytearray(pixels.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        pixels.write_bytes(bytes(raw))
    elif damage == "labels":
        (entry / "test.labels").write_bytes(b"\1" * 16)
    else:
        (entry / "index.json").unlink()
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        again = load_dataset(f"folder:{root}")
    assert "damaged" in caplog.text and "decoding it again" in caplog.text
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)
    caplog.clear()
    load_dataset(f"folder:{root}")
    assert "damaged" not in caplog.text


# --- stored sizes --------------------------------------------------------------------------------


def test_folder_images_are_stored_at_the_run_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for split, name, size in (("train", "a", (300, 200)), ("train", "b", (400, 400)), ("test", "a", (500, 260))):
        (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
        _smooth(rng, size).save(tmp_path / split / name / "x.png")
    source = f"folder:{tmp_path}"
    assert load_dataset(source).train_x.shape[1:] == (3, 260, 260)  # the median shorter side: no 256 cap
    assert load_dataset(source, image_size=224).train_x.shape[1:] == (3, 224, 224)
    assert load_dataset(source, image_size=224, store_size=96).train_x.shape[1:] == (3, 96, 96)
    uniform = _jpeg_tree(tmp_path / "uniform", {"train": 2, "test": 1}, (64, 48))
    assert load_dataset(f"folder:{uniform}", image_size=64).train_x.shape[1:] == (3, 48, 64)  # as they are
    assert load_dataset(f"folder:{uniform}", image_size=32).train_x.shape[1:] == (3, 32, 32)


def test_the_resize_is_antialiased_and_keeps_a_flat_image_flat(tmp_path: Path) -> None:
    from cnnlab.core import images

    stripes = np.zeros((64, 96, 3), dtype=np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: a resize without antialiasing keeps them at full contrast
    out = images._fit(stripes, (16, 16))
    assert out.shape == (3, 16, 16) and 100 < out.mean() < 155 and out.std() < 20
    flat = np.full((50, 70), 77, dtype=np.uint8)
    assert images._fit(flat, (20, 20)).shape == (1, 20, 20) and (images._fit(flat, (20, 20)) == 77).all()


# --- CSV lists -----------------------------------------------------------------------------------


def _csv_tree(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    written = {}
    for i in range(6):
        name = f"img/{i}.png"
        arr = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / name)
        written[name] = arr.transpose(2, 0, 1)
    return written


def test_a_csv_list_of_paths_and_labels(tmp_path: Path) -> None:
    written = _csv_tree(tmp_path)
    rows = [("img/0.png", "cat", "train"), ("img/1.png", "dog", "train"), ("img/2.png", "cat", "train"),
            ("img/3.png", "dog", "test"), ("img/4.png", "cat", "test")]
    (tmp_path / "all.csv").write_text("path,label,split\n" + "".join(f"{p},{label},{s}\n" for p, label, s in rows))
    ds = load_dataset(f"folder:{tmp_path / 'all.csv'}")
    assert ds.classes == ["cat", "dog"] and ds.train_y.tolist() == [0, 1, 0] and ds.test_y.tolist() == [1, 0]
    assert np.array_equal(ds.train_x[1].numpy(), written["img/1.png"])
    assert np.array_equal(ds.test_x[1].numpy(), written["img/4.png"])

    (tmp_path / "train.csv").write_text("label,path\ncat,img/0.png\ndog,img/5.png\n")
    (tmp_path / "test.csv").write_text("label,path\ndog,img/3.png\n")
    pair = load_dataset(f"folder:{tmp_path}")
    assert pair.train_y.tolist() == [0, 1] and np.array_equal(pair.train_x[1].numpy(), written["img/5.png"])


@pytest.mark.parametrize("text, message", [
    ("file,label,split\nimg/0.png,cat,train\n", "path and label columns"),
    ("path,label\nimg/0.png,cat\n", "split column"),
    ("path,label,split\nimg/0.png,cat,valid\n", "line 2: split 'valid'"),
    ("path,label,split\nimg/0.png,cat,train\nimg/9.png,cat,test\n", "img/9.png"),
    ("path,label,split\nimg/0.png,cat,train\nimg/1.png,cow,test\n", "test labels cow"),
])
def test_csv_mistakes_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    _csv_tree(tmp_path)
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(UserError, match=message) as err:
        load_dataset(f"folder:{tmp_path / 'list.csv'}")
    assert "\n" not in str(err.value)


# --- a Hugging Face dataset saved with save_to_disk ----------------------------------------------


def _hf_saved(root: Path) -> tuple[Path, dict[str, list[np.ndarray]]]:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(5)
    features = datasets.Features({"label": datasets.ClassLabel(names=["cat", "dog"]), "image": datasets.Image()})
    pixels, splits = {}, {}
    for split, n in (("train", 5), ("test", 3)):
        pixels[split] = [rng.integers(0, 256, (6, 8, 3), dtype=np.uint8) for _ in range(n)]
        splits[split] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(a) for a in pixels[split]], "label": [i % 2 for i in range(n)]},
            features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root, pixels


def test_a_saved_hugging_face_dataset(tmp_path: Path) -> None:
    root, pixels = _hf_saved(tmp_path / "hf")
    ds = load_dataset(f"folder:{root}")
    assert ds.classes == ["cat", "dog"] and ds.train_y.tolist() == [0, 1, 0, 1, 0] and ds.test_y.tolist() == [0, 1, 0]
    for split, x in (("train", ds.train_x), ("test", ds.test_x)):
        # PNG: lossless
        assert all(np.array_equal(x[i].numpy(), a.transpose(2, 0, 1)) for i, a in enumerate(pixels[split]))


def test_a_hugging_face_dataset_without_the_library_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"cnnlab\[hf\]"):
        load_dataset(f"folder:{tmp_path / 'hf'}")


def test_a_build_started_off_the_main_thread_decodes_in_process_and_gives_the_same_pixels(tmp_path, monkeypatch):
    # A fork from a thread other than the main one can copy a lock another thread holds, and the child
    # then hangs (a server thread opening a dataset did): such a build decodes without a pool.
    import threading

    from cnnlab.data.readers import pool as pools

    monkeypatch.setattr(pools, "POOL_MIN_IMAGES", 1)  # a pool for any set, where one is allowed
    monkeypatch.setattr(pools, "worker_count", lambda: 2)
    with pools.executor(10, 0) as (pool, _):
        assert pool is not None  # the main thread forks as before

    seen: dict[str, object] = {}

    def off_main() -> None:
        with pools.executor(10, 0) as (pool, _):
            seen["pool"] = pool
        monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache-thread"))
        seen["data"] = load_dataset(f"folder:{root}")

    root = _jpeg_tree(tmp_path / "folder", {"train": 12, "test": 4}, (40, 30))
    worker = threading.Thread(target=off_main)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the build off the main thread did not finish"
    assert seen["pool"] is None
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache-main"))
    main = load_dataset(f"folder:{root}")  # decoded by the pool
    assert torch.equal(seen["data"].train_x, main.train_x) and torch.equal(seen["data"].test_x, main.test_x)
    assert torch.equal(seen["data"].train_y, main.train_y)
