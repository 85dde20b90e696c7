"""Dataset sources: official CIFAR pickles, image folders and archives, the sample, the cache."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.core.errors import UserError
from cnnlab.data import DATASET_CHOICES, Dataset, load_dataset, open_dataset
from cnnlab.data.readers import SAMPLE_ARCHIVE, decoding

REPO = Path(__file__).resolve().parents[1]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --- helpers -------------------------------------------------------------------------------------


def _pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _write_png_tree(root: Path, layout: dict[str, dict[str, int]], size=(8, 6), mode="RGB") -> dict[str, np.ndarray]:
    """Write ``layout[split][class] = count`` PNGs of ``size`` (w, h); return pixels by relative path (C, H, W)."""
    written = {}
    seed = 0
    for split, classes in layout.items():
        for cls, count in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                w, h = size
                arr = _pixels(seed, (h, w, 3) if mode == "RGB" else (h, w))
                Image.fromarray(arr, mode=mode).save(folder / f"{i:03d}.png")
                written[f"{split}/{cls}/{i:03d}.png"] = arr.transpose(2, 0, 1) if arr.ndim == 3 else arr[None]
    return written


def _tar_of(root: Path, out: Path, prefix: str = "") -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(root / split, arcname=prefix + split)
    return out


def _zip_of(root: Path, out: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted(root.rglob("*")):
            archive.write(path, prefix + path.relative_to(root).as_posix())
    return out


def _assert_same(a: Dataset, b: Dataset) -> None:
    assert a.classes == b.classes
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


LAYOUT = {"train": {"zebra": 3, "ant": 2, "moth": 2}, "test": {"ant": 1, "zebra": 2}}


@pytest.fixture
def png_tree(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "tree"
    return root, _write_png_tree(root, LAYOUT)


# --- official CIFAR-10 ---------------------------------------------------------------------------


def _fake_cifar(root: Path, per_batch: int = 4) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [c.encode() for c in CIFAR_CLASSES]
    train_x, train_y = [], []
    for i in range(1, 6):
        data, labels = _pixels(i, (per_batch, 3072)), [(i + j) % 10 for j in range(per_batch)]
        train_x.append(data)
        train_y += labels
        batch = {b"batch_label": b"training batch", b"data": data, b"labels": labels,
                 b"filenames": [b"x.png"] * per_batch}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test_x, test_y = _pixels(99, (3, 3072)), [9, 0, 5]
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": test_x, b"labels": test_y}, protocol=4))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return np.concatenate(train_x), train_y, test_x, test_y


def test_official_cifar10_round_trip(tmp_path: Path) -> None:
    train_x, train_y, test_x, test_y = _fake_cifar(tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.name == "cifar10" and ds.classes == CIFAR_CLASSES
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.train_x.dtype == torch.uint8 and ds.train_x.is_contiguous()
    assert ds.test_x.shape == (3, 3, 32, 32) and ds.train_y.dtype == torch.int64
    assert ds.train_y.tolist() == train_y and ds.test_y.tolist() == test_y
    # Each row is the R plane, then G, then B, each 32×32 row-major.
    assert np.array_equal(ds.train_x.numpy(), train_x.reshape(-1, 3, 32, 32))
    assert ds.train_x[0, 1, 0, 0].item() == train_x[0, 1024] and ds.train_x[0, 2, 1, 0].item() == train_x[0, 2048 + 32]
    assert np.array_equal(ds.test_x.numpy(), test_x.reshape(-1, 3, 32, 32))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_official_cifar10_refuses_code_in_pickles(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    marker = tmp_path / "marker"
    batch = {b"data": _Evil(marker), b"labels": [0]}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(batch))
    with pytest.raises(UserError, match="data_batch_3.*system"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()


def test_missing_cifar10_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "`download`" in message and "\n" not in message


def test_unknown_spec_lists_choices() -> None:
    with pytest.raises(UserError) as err:
        load_dataset("imagenet")
    assert all(choice in str(err.value) for choice in DATASET_CHOICES)


# --- folders and archives ------------------------------------------------------------------------


def test_folder_pixels_and_labels(png_tree) -> None:
    root, written = png_tree
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    (root / "train" / "ant" / ".hidden.png").write_bytes(b"junk")
    ds = load_dataset(f"folder:{root}")
    assert ds.name == f"folder:{root}"
    assert ds.classes == ["ant", "moth", "zebra"]
    assert ds.train_x.shape == (7, 3, 6, 8) and ds.test_x.shape == (3, 3, 6, 8)
    for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        paths = sorted(p for p in written if p.startswith(split + "/"))
        assert y.tolist() == [ds.classes.index(p.split("/")[1]) for p in paths]
        for i, p in enumerate(paths):
            assert np.array_equal(x[i].numpy(), written[p]), p


def test_archives_and_nesting_give_identical_tensors(png_tree, tmp_path: Path) -> None:
    root, _ = png_tree
    plain = load_dataset(f"folder:{root}")
    nested = tmp_path / "nested"
    (nested / "top").mkdir(parents=True)
    (root).rename(nested / "top" / "tree")
    inner = nested / "top" / "tree"
    for source in (
        inner,
        _tar_of(inner, tmp_path / "a.tar.gz"),
        _zip_of(inner, tmp_path / "a.zip"),
        _tar_of(inner, tmp_path / "nested.tgz", prefix="data/"),
        _zip_of(inner, tmp_path / "nested.zip", prefix="data/"),
    ):
        _assert_same(load_dataset(f"folder:{source}"), plain)


def _tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pixels(1, (4, 4, 3))).save(buf, "PNG")
    return buf.getvalue()


def _good_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [(tarfile.TarInfo("train/cat/a.png"), _png_bytes()), (tarfile.TarInfo("test/cat/a.png"), _png_bytes())]


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def _device(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info, b""


@pytest.mark.parametrize(
    "bad, member",
    [
        ((tarfile.TarInfo("../evil"), b"x"), "../evil"),
        ((tarfile.TarInfo("train/../../evil.png"), b"x"), "train/../../evil.png"),
        ((tarfile.TarInfo("/tmp/evil_abs"), b"x"), "/tmp/evil_abs"),
        (_link("train/cat/b.png", "/etc/passwd"), "train/cat/b.png"),
        (_link("train/cat/c.png", "../../../outside"), "train/cat/c.png"),
        (_link("train/cat/d.png", "../../../outside", tarfile.LNKTYPE), "train/cat/d.png"),
        (_device("train/cat/null"), "train/cat/null"),
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path: Path, bad, member: str) -> None:
    archive = _tar_with(tmp_path / "bad.tar", *_good_members(), bad)
    with pytest.raises(UserError) as err:
        load_dataset(f"folder:{archive}")
    assert repr(member) in str(err.value)
    assert not (tmp_path.parent / "evil").exists() and not Path("/tmp/evil_abs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar"]


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png", "train/cat/../../../evil.png"])
def test_unsafe_zip_members_are_refused(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/cat/a.png", _png_bytes())
        zf.writestr("test/cat/a.png", _png_bytes())
        zf.writestr(zipfile.ZipInfo(member), b"x")
    with pytest.raises(UserError, match="refusing"):
        load_dataset(f"folder:{archive}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_link_inside_archive_is_ignored(tmp_path: Path) -> None:
    archive = _tar_with(tmp_path / "ok.tar", *_good_members(), _link("train/cat/b.png", "a.png"))
    assert load_dataset(f"folder:{archive}").train_x.shape == (1, 3, 4, 4)


def test_grayscale_only_keeps_one_channel(tmp_path: Path) -> None:
    written = _write_png_tree(tmp_path, {"train": {"a": 2, "b": 1}, "test": {"a": 1}}, mode="L")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.train_x.shape == (3, 1, 6, 8)
    assert np.array_equal(ds.train_x[0].numpy(), written["train/a/000.png"])


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / split / "a" / "x.png")
        Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(tmp_path / split / "a" / "y.png")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.train_x.shape == (2, 1, 4, 4)
    assert ds.train_x[:, 0, 0, 0].tolist() == [255, 128]


def test_mixed_gray_and_colour_becomes_rgb(tmp_path: Path) -> None:
    gray = _write_png_tree(tmp_path, {"train": {"a": 1}, "test": {"a": 1}}, mode="L")
    Image.fromarray(_pixels(5, (6, 8, 3))).save(tmp_path / "train" / "a" / "rgb.png")
    Image.fromarray(_pixels(6, (6, 8, 4)), mode="RGBA").save(tmp_path / "train" / "a" / "rgba.png")
    Image.fromarray(_pixels(7, (6, 8)), mode="L").convert("P").save(tmp_path / "train" / "a" / "pal.png")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.train_x.shape == (4, 3, 6, 8)
    assert np.array_equal(ds.train_x[0].numpy(), np.repeat(gray["train/a/000.png"], 3, axis=0))


def test_odd_sizes_share_one_square(tmp_path: Path) -> None:
    for split, name, (w, h) in (("train", "a", (37, 53)), ("train", "b", (64, 64)), ("test", "a", (20, 90))):
        (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pixels(w, (h, w, 3))).save(tmp_path / split / name / f"{w}x{h}.jpg")
    ds = load_dataset(f"folder:{tmp_path}")
    # Median of the shorter sides 37, 64, 20.
    assert ds.train_x.shape == (2, 3, 37, 37) and ds.test_x.shape == (1, 3, 37, 37)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_broken_image_is_named(tmp_path: Path, damage: str) -> None:
    _write_png_tree(tmp_path, {"train": {"a": 1, "b": 1}, "test": {"a": 1}})
    buf = io.BytesIO()
    Image.fromarray(_pixels(3, (64, 64, 3))).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    (tmp_path / "train" / "b" / "bad.jpg").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(UserError, match="train/b/bad.jpg"):
        load_dataset(f"folder:{tmp_path}")


def test_empty_class_folder_is_refused(tmp_path: Path) -> None:
    _write_png_tree(tmp_path, {"train": {"a": 1}, "test": {"a": 1}})
    (tmp_path / "train" / "lonely").mkdir()
    (tmp_path / "train" / "lonely" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="train/lonely"):
        load_dataset(f"folder:{tmp_path}")


def test_split_without_images_is_refused(tmp_path: Path) -> None:
    _write_png_tree(tmp_path, {"train": {"a": 1}})
    with pytest.raises(UserError, match="test split has no images"):
        load_dataset(f"folder:{tmp_path}")


def test_test_class_missing_from_train_is_refused(tmp_path: Path) -> None:
    _write_png_tree(tmp_path, {"train": {"a": 1}, "test": {"a": 1, "ghost": 1}})
    with pytest.raises(UserError, match="ghost"):
        load_dataset(f"folder:{tmp_path}")


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")


def test_over_the_memory_budget_the_splits_stay_in_the_cache(png_tree, monkeypatch) -> None:
    from cnnlab.data import loader, splits, store

    root, _ = png_tree
    data = splits.split(open_dataset(f"folder:{root}"), val_split=2)
    monkeypatch.setattr(loader, "memory_budget_bytes", lambda: 100)
    placed = loader.place(data, torch.device("cpu"))
    assert all(isinstance(x, store.PixelStore) for x in (placed.train_x, placed.val_x, placed.test_x))
    monkeypatch.setattr(loader, "memory_budget_bytes", lambda: 10**9)
    in_memory = loader.place(data, torch.device("cpu"))
    assert torch.equal(in_memory.train_x, placed.train_x[torch.arange(len(placed.train_x))])
    assert torch.equal(in_memory.val_x, placed.val_x[:]) and torch.equal(in_memory.test_x, placed.test_x[0:100])
    assert isinstance(loader.place(data, torch.device("cpu"), on_device=False).train_x, store.PixelStore)


def test_second_load_uses_the_cache(png_tree, tmp_path: Path, monkeypatch) -> None:
    root, _ = png_tree
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    archive = _tar_of(root, tmp_path / "cached.tar.gz")
    for source in (root, archive):
        first = load_dataset(f"folder:{source}")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(decoding, "decode_into", no_decoding)
    for source in (root, archive):
        _assert_same(load_dataset(f"folder:{source}"), first)
    assert len([p for p in (tmp_path / "cache" / "datasets").iterdir() if p.is_dir()]) == 2  # one entry per source
    # A changed image is a different source: the cache must not answer for it.
    Image.fromarray(_pixels(123, (6, 8, 3))).save(root / "train" / "ant" / "000.png")
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset(f"folder:{root}")


# --- the bundled sample and the real archive -----------------------------------------------------


def test_sample() -> None:
    assert SAMPLE_ARCHIVE.stat().st_size <= 3 * 2**20
    ds = load_dataset("sample")
    assert ds.name == "sample" and ds.classes == CIFAR_CLASSES
    assert ds.train_x.shape == (5000, 3, 32, 32) and ds.test_x.shape == (1000, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert torch.bincount(ds.train_y).tolist() == [500] * 10
    assert torch.bincount(ds.test_y).tolist() == [100] * 10


def test_make_sample_is_reproducible(cifar10_jpeg: Path, tmp_path: Path) -> None:
    out = tmp_path / "sample.tar.gz"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_sample.py"), str(cifar10_jpeg), "--out", str(out)],
                   check=True)
    bundled = SAMPLE_ARCHIVE.read_bytes()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(bundled).hexdigest()


def test_real_cifar10_jpeg_archive(cifar10_jpeg: Path) -> None:
    ds = load_dataset(f"folder:{cifar10_jpeg}")
    assert ds.classes == CIFAR_CLASSES
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.test_x.is_contiguous()
    assert torch.bincount(ds.train_y).tolist() == [5000] * 10 and torch.bincount(ds.test_y).tolist() == [1000] * 10
