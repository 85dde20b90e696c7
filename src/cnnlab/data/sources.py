"""Dataset sources: official CIFAR-10 pickles, image folders and archives, the bundled sample.

Every source becomes the same thing: uint8 image tensors (N, C, H, W) with int64 labels and the
class names. Decoding compressed images is the slow part, so folder and archive sources are
decoded once and cached under ``cache_dir()/datasets`` keyed by their content.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cnnlab.core import images
from cnnlab.data.archives import ArchiveContents, is_archive, member_limit, physical_memory, read_archive
from cnnlab.core.errors import UserError

DATASET_CHOICES = ("cifar10", "sample", "folder:PATH")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))

SAMPLE_ARCHIVE = Path(__file__).parent / "sample" / "cifar10-sample.tar.gz"

# Part of every cache key: bump it whenever decoding would give different pixels or labels.
DECODER_VERSION = 2  # 2: one decoder with predict (wide grayscale rescaled in RGB datasets too)
MAX_FIT_SIDE = 256  # mixed-size folders are resized to a square no larger than this
POOL_MIN_IMAGES = 4000  # below this a process pool costs more than it saves
POOL_CHUNK = 1000

_T = TypeVar("_T")  # what a chunk function returns



@dataclass
class Dataset:
    """A whole labelled dataset in memory, as uint8 pixels."""

    name: str  # "cifar10", "sample", or "folder:<path>"
    classes: list[str]
    train_x: torch.Tensor  # uint8 (N, C, H, W), contiguous, C is 1 or 3
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    skipped: list[str] = field(default_factory=list)  # unreadable images left out (--skip-bad-images)
    # sha256 of the source's content (files and folder names, or CIFAR-10's pixels and labels): a run
    # records it, and --resume refuses to continue on data that changed under the same class names.
    fingerprint: str = ""


def default_data_dir() -> Path:
    """Where ``cifar10`` looks for (and downloads) the official files: $CNNLAB_DATA or ~/.cache/cnnlab/data."""
    env = os.environ.get("CNNLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cnnlab" / "data"


def cache_dir() -> Path:
    """Root of cnnlab's caches: $CNNLAB_CACHE or ~/.cache/cnnlab."""
    env = os.environ.get("CNNLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cnnlab"


def memory_budget_bytes() -> int:
    """How many bytes of decoded pixels we allow ourselves: half of physical RAM."""
    return physical_memory() // 2


def load_dataset(spec: str, data_dir: str | Path | None = None, download: bool = False,
                 skip_bad_images: bool = False) -> Dataset:
    """Load the dataset named by ``spec`` (one of ``DATASET_CHOICES``) into memory.

    An image that cannot be decoded stops the load with its name, unless ``skip_bad_images``:
    then it is left out and listed in ``Dataset.skipped``.
    """
    if spec == "cifar10":
        return _load_cifar10(Path(data_dir).expanduser() if data_dir else default_data_dir(), download)
    if spec == "sample":
        return _load_folder(SAMPLE_ARCHIVE, name="sample", skip_bad=skip_bad_images)
    if spec.startswith("folder:"):
        location = spec[len("folder:") :]
        if not location:
            raise UserError("--dataset folder: needs a path, e.g. folder:~/images or folder:images.tar.gz")
        return _load_folder(Path(location).expanduser(), name=spec, skip_bad=skip_bad_images)
    raise UserError(f"unknown dataset {spec!r}: choose one of {', '.join(DATASET_CHOICES)}")


# --- official CIFAR-10 ---------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers, and nothing else.

    The CIFAR files are pickles, and a pickle can run any code it names; only the globals the
    format needs are let through, so a tampered file fails instead of executing.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("builtins", "dict"),
            ("builtins", "list"),
            ("builtins", "bytes"),
            ("builtins", "bytearray"),
            ("_codecs", "encode"),  # how protocol-2 pickles spell bytes objects
        }
    )

    def find_class(self, module: str, name: str):  # noqa: ANN201 - signature fixed by pickle
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR-10 file never needs")


def _read_cifar_pickle(path: Path) -> dict[str, object]:
    """One CIFAR batch or meta file as a dict with str keys, read with the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            content = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise UserError(f"{path} is not a valid CIFAR-10 file ({exc}); delete it and rerun with --download") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a valid CIFAR-10 file (no dict inside); delete it and rerun with --download")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in content.items()}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_cifar_pickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path} has no N×3072 uint8 'data' array; delete it and rerun with --download")
    labels_arr = np.asarray(labels, dtype=np.int64) if isinstance(labels, list | np.ndarray) else None
    if labels_arr is None or labels_arr.shape != (data.shape[0],):
        raise UserError(f"{path} has no 'labels' list matching its images; delete it and rerun with --download")
    # Rows hold the R, G and B planes one after another, each 32×32 row-major.
    return data.reshape(-1, 3, 32, 32), labels_arr


def _find_cifar10(data_dir: Path) -> Path | None:
    needed = (*CIFAR10_TRAIN_BATCHES, "test_batch", "batches.meta")
    for folder in (data_dir / CIFAR10_FOLDER, data_dir):
        if all((folder / name).is_file() for name in needed):
            return folder
    return None


def _download_cifar10(data_dir: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive  # only for --download: saves a second at start

    try:
        download_and_extract_archive(CIFAR10_URL, download_root=str(data_dir), md5=CIFAR10_MD5)
    except (OSError, RuntimeError) as exc:  # network failure, or torchvision's checksum mismatch
        raise UserError(
            f"could not download CIFAR-10 from {CIFAR10_URL} into {data_dir} ({exc}); "
            f"download it by hand and pass --data-dir, or use --dataset sample"
        ) from None


def _load_cifar10(data_dir: Path, download: bool) -> Dataset:
    folder = _find_cifar10(data_dir)
    if folder is None and download:
        _download_cifar10(data_dir)
        folder = _find_cifar10(data_dir)
    if folder is None:
        raise UserError(
            f"CIFAR-10 not found in {data_dir / CIFAR10_FOLDER}: pass --download to fetch it, "
            f"point --data-dir at a folder holding {CIFAR10_FOLDER}, or use --dataset folder:PATH or --dataset sample"
        )
    meta = _read_cifar_pickle(folder / "batches.meta")
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise UserError(f"{folder / 'batches.meta'} has no 'label_names'; delete it and rerun with --download")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    train = [_read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_BATCHES]
    test_x, test_y = _read_cifar_batch(folder / "test_batch")
    train_x, train_y = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
    for y, name in ((train_y, "training"), (test_y, "test")):
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise UserError(f"CIFAR-10 {name} labels in {folder} exceed the {len(classes)} classes; rerun with --download")
    train_x, test_x = np.ascontiguousarray(train_x), np.ascontiguousarray(test_x)
    digest = hashlib.sha256("\0".join(classes).encode())
    for array in (train_x, train_y, test_x, test_y):
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return Dataset(
        name="cifar10",
        classes=classes,
        train_x=torch.from_numpy(train_x),
        train_y=torch.from_numpy(train_y),
        test_x=torch.from_numpy(test_x),
        test_y=torch.from_numpy(test_y),
        fingerprint=digest.hexdigest(),
    )


# --- image folders and archives ------------------------------------------------------------------


def _image_extensions() -> frozenset[str]:
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _is_hidden(part: str) -> bool:
    # macOS zips carry a __MACOSX/ tree of resource forks next to the real files.
    return part.startswith(".") or part == "__MACOSX"


def _is_candidate(relpath: str, extensions: frozenset[str]) -> bool:
    """Whether a file is an image we should decode: a PIL extension and no hidden path part."""
    parts = relpath.split("/")
    return not any(_is_hidden(p) for p in parts) and os.path.splitext(parts[-1])[1].lower() in extensions


def _read_directory(root: Path) -> ArchiveContents:
    """Every candidate image under ``root``, as bytes. Folders and files that are symbolic links are
    followed (datasets are often assembled from links); a link back into its own ancestry is refused.
    Each file is checked against the per-image size bound before it is read."""
    extensions = _image_extensions()
    contents = ArchiveContents()
    limit = member_limit()
    for folder, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not _is_hidden(d))
        here = os.path.realpath(folder)
        for d in subdirs:
            if os.path.islink(os.path.join(folder, d)):
                target = os.path.realpath(os.path.join(folder, d))
                if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                    raise UserError(f"{Path(folder, d)} is a link to a folder that contains it ({target}); "
                                    "remove the link, it would be read forever")
        rel_folder = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel_folder == "." else rel_folder + "/"
        contents.dirs.update(prefix + d for d in subdirs)
        for name in files:
            rel = prefix + name
            if _is_candidate(rel, extensions):
                path = Path(folder, name)
                try:
                    size = path.stat().st_size
                    if size > limit:
                        raise UserError(f"{path} is {size / 2**20:,.0f} MiB, more than any image cnnlab reads "
                                        f"({limit / 2**20:,.0f} MiB, see CNNLAB_MAX_IMAGE_BYTES); remove it")
                    contents.files[rel] = path.read_bytes()
                except OSError as exc:
                    raise UserError(f"cannot read {path}: {exc.strerror}; check that it exists and "
                                    "its permissions") from None
    return contents


def _hash_file(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_key(content: str) -> str:
    """Decoded pixels depend on the content and on the decoder: both are in the cache key."""
    return hashlib.sha256(f"cnnlab-decoder-{DECODER_VERSION}\0{content}".encode()).hexdigest()


def _hash_contents(contents: ArchiveContents) -> str:
    """sha256 of a folder's layout and image bytes."""
    digest = hashlib.sha256()
    for d in sorted(contents.dirs):  # empty class folders change the outcome too
        digest.update(f"d\0{d}\0".encode())
    for rel in sorted(contents.files):
        data = contents.files[rel]
        digest.update(f"f\0{rel}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _strip_single_top(contents: ArchiveContents) -> ArchiveContents:
    """Accept ``top/train/...`` as if it were ``train/...`` when one folder holds everything."""
    tops = {rel.split("/", 1)[0] for rel in contents.files}
    if len(tops) != 1 or tops & {"train", "test"} or not all("/" in rel for rel in contents.files):
        return contents
    prefix = tops.pop() + "/"
    return ArchiveContents(
        files={rel[len(prefix) :]: data for rel, data in contents.files.items()},
        dirs={d[len(prefix) :] for d in contents.dirs if d.startswith(prefix)},
    )


def _split_layout(
    contents: ArchiveContents, source: Path
) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Class names (sorted train folders) and, per split, the (path, label) pairs in path order."""
    layout_hint = "expected train/<class>/<images> and test/<class>/<images>"
    per_split: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for d in contents.dirs:
        parts = d.split("/")
        if len(parts) >= 2 and parts[0] in per_split and not _is_hidden(parts[1]):
            per_split[parts[0]].setdefault(parts[1], [])
    for rel in sorted(contents.files):
        parts = rel.split("/")
        if parts[0] not in per_split:
            continue  # images outside train/ and test/ are not part of the layout
        if len(parts) == 2:
            raise UserError(f"{source}: {rel} is not inside a class folder; {layout_hint}")
        per_split[parts[0]].setdefault(parts[1], []).append(rel)

    for split, folders in per_split.items():
        if not any(folders.values()):
            raise UserError(f"{source}: the {split} split has no images; {layout_hint}")
        for cls, files in sorted(folders.items()):
            if not files:
                raise UserError(f"{source}: class folder {split}/{cls} has no images; add some or remove the folder")
    classes = sorted(per_split["train"])
    extra = sorted(set(per_split["test"]) - set(classes))
    if extra:
        raise UserError(f"{source}: test classes {', '.join(extra)} have no train/ folder; add them to train/ or remove them from test/")
    index = {cls: i for i, cls in enumerate(classes)}
    splits = {
        split: sorted((rel, index[cls]) for cls, files in folders.items() for rel in files)
        for split, folders in per_split.items()
    }
    return classes, splits


@dataclass(frozen=True)
class _DecodePlan:
    """What every image becomes: its channel count and size, and whether it must be resized."""

    channels: int
    height: int
    width: int
    fit: bool


def _probe(rel: str, data: bytes, source: str) -> tuple[str, int, int]:
    """Mode, width and height from the image header, without decoding pixels."""
    try:
        return images.header(data)
    except images.DECODE_ERRORS as exc:
        raise UserError(f"{source}: cannot read image {rel} ({exc}); remove or replace the file, "
                        "or pass --skip-bad-images to leave such files out") from None


def _probe_chunk(items: list[tuple[str, bytes]], source: str, skip_bad: bool) -> list[tuple[str, int, int] | None]:
    """Headers of a chunk; with ``skip_bad`` an unreadable image gives None instead of stopping."""
    headers: list[tuple[str, int, int] | None] = []
    for rel, data in items:
        try:
            headers.append(_probe(rel, data, source))
        except UserError:
            if not skip_bad:
                raise
            headers.append(None)
    return headers


def _plan(modes: set[str], sizes: list[tuple[int, int]]) -> _DecodePlan:
    channels = 1 if modes <= images.GRAY_MODES else 3
    if len(set(sizes)) == 1:
        width, height = sizes[0]
        return _DecodePlan(channels, height, width, fit=False)
    side = min(MAX_FIT_SIDE, statistics.median_low(min(w, h) for w, h in sizes))
    return _DecodePlan(channels, side, side, fit=True)


def _decode_one(data: bytes, plan: _DecodePlan) -> np.ndarray:
    return images.decode(data, plan.channels, fit=(plan.width, plan.height) if plan.fit else None)


def _decode_chunk(items: list[tuple[str, bytes]], plan: _DecodePlan, source: str,
                  skip_bad: bool) -> tuple[np.ndarray, list[int]]:
    """Decode a list of (path, bytes) into one (n, C, H, W) array; runs in worker processes too.

    Also returns the indices of images that failed (only with ``skip_bad``; else the first stops it).
    """
    out = np.empty((len(items), plan.channels, plan.height, plan.width), dtype=np.uint8)
    failed = []
    for i, (rel, data) in enumerate(items):
        try:
            out[i] = _decode_one(data, plan)
        except images.DECODE_ERRORS as exc:
            if not skip_bad:
                raise UserError(f"{source}: cannot decode image {rel} ({exc}); remove or replace the file, "
                                "or pass --skip-bad-images to leave such files out") from None
            failed.append(i)
    return out, failed


def _worker_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def _decode_executor(total: int) -> Iterator[Executor | None]:
    """A process pool for big sets where fork is available (no re-import cost), else nothing."""
    workers = _worker_count()
    if total < POOL_MIN_IMAGES or workers < 2 or sys.platform != "linux":
        yield None
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        yield pool
    finally:
        # After a bad image there is no point finishing the other chunks.
        pool.shutdown(wait=True, cancel_futures=True)


def _map_chunks(fn: Callable[..., _T], items: list[tuple[str, bytes]], pool: Executor | None, *args: object) -> Iterator[_T]:
    """``fn(chunk, *args)`` over consecutive chunks of ``items``, in order, in the pool if there is one."""
    chunks = [items[i : i + POOL_CHUNK] for i in range(0, len(items), POOL_CHUNK)]
    if pool is None:
        return (fn(chunk, *args) for chunk in chunks)
    return pool.map(fn, chunks, *([arg] * len(chunks) for arg in args))


def _decode_splits(
    splits: list[list[tuple[str, bytes]]], plan: _DecodePlan, source: Path, pool: Executor | None, skip_bad: bool
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Decode each split into a preallocated uint8 tensor, with one progress bar for all of them.

    Also returns, per split, the indices of the images that could not be decoded (with ``skip_bad``).
    """
    total = sum(len(items) for items in splits)
    outputs, failures = [], []
    with tqdm(total=total, desc=f"decoding {source.name}", unit="img", file=sys.stderr, leave=False,
              disable=not sys.stderr.isatty()) as bar:
        for items in splits:
            buffer = torch.empty((len(items), plan.channels, plan.height, plan.width), dtype=torch.uint8)
            target = buffer.numpy()
            start, failed = 0, []
            for decoded, bad in _map_chunks(_decode_chunk, items, pool, plan, str(source), skip_bad):
                target[start : start + len(decoded)] = decoded
                failed += [start + i for i in bad]
                start += len(decoded)
                bar.update(len(decoded))
            outputs.append(buffer)
            failures.append(failed)
    return outputs, failures


def _decode_folder(contents: ArchiveContents, source: Path, skip_bad: bool = False) -> dict[str, object]:
    contents = _strip_single_top(contents)
    classes, splits = _split_layout(contents, source)
    items = {split: [(rel, contents.files[rel], label) for rel, label in splits[split]] for split in ("train", "test")}
    skipped: list[str] = []

    def keep(split: str, bad: set[int]) -> None:
        skipped.extend(items[split][i][0] for i in sorted(bad))
        items[split] = [item for i, item in enumerate(items[split]) if i not in bad]

    everything = items["train"] + items["test"]
    with _decode_executor(len(everything)) as pool:
        # The cheap pass: headers only, to settle channels and size before any pixel is decoded.
        pairs = [(rel, data) for rel, data, _ in everything]
        headers = [h for chunk in _map_chunks(_probe_chunk, pairs, pool, str(source), skip_bad) for h in chunk]
        n_train = len(items["train"])
        keep("train", {i for i, h in enumerate(headers[:n_train]) if h is None})
        keep("test", {i for i, h in enumerate(headers[n_train:]) if h is None})
        headers = [h for h in headers if h is not None]
        _check_not_emptied(items, classes, source)
        plan = _plan({mode for mode, _, _ in headers}, [(w, h) for _, w, h in headers])
        needed = len(headers) * plan.channels * plan.height * plan.width
        budget = memory_budget_bytes()
        if needed > budget:
            raise UserError(
                f"{source}: {len(headers):,} images of {plan.channels}×{plan.height}×{plan.width} need "
                f"{needed / 2**30:.1f} GiB of memory, over the {budget / 2**30:.1f} GiB budget (half the RAM); "
                f"use a subset or smaller images"
            )
        pixels, failures = _decode_splits([[(rel, data) for rel, data, _ in items[split]] for split in ("train", "test")],
                                          plan, source, pool, skip_bad)
    result: dict[str, object] = {"classes": classes}
    for split, x, failed in zip(("train", "test"), pixels, failures):
        if failed:  # images whose header read fine but whose pixels did not (e.g. truncated files)
            kept = torch.ones(len(x), dtype=torch.bool)
            kept[failed] = False
            x = x[kept]
            keep(split, set(failed))
        result[f"{split}_x"] = x
        result[f"{split}_y"] = torch.tensor([label for _, _, label in items[split]], dtype=torch.int64)
    _check_not_emptied(items, classes, source)
    result["skipped"] = skipped
    return result


def _check_not_emptied(items: dict[str, list[tuple[str, bytes, int]]], classes: list[str], source: Path) -> None:
    """After leaving bad images out, every train class and the test split must still have images."""
    present = {label for _, _, label in items["train"]}
    emptied = [c for i, c in enumerate(classes) if i not in present]
    if emptied:
        raise UserError(f"{source}: no readable training images are left in class {', '.join(emptied)}; "
                        "replace the unreadable files")
    if not items["test"]:
        raise UserError(f"{source}: no readable test images are left; replace the unreadable files")


# --- cache ---------------------------------------------------------------------------------------

_CACHE_KEYS = ("classes", "train_x", "train_y", "test_x", "test_y")


def _cache_path(key: str) -> Path:
    return cache_dir() / "datasets" / f"{key}.pt"


def _read_cache(path: Path) -> dict[str, object] | None:
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged cache file is simply decoded again
        return None
    return cached if isinstance(cached, dict) and all(k in cached for k in _CACHE_KEYS) else None


def _write_cache(path: Path, tensors: dict[str, object]) -> None:
    # Temp file + rename: a crash or a concurrent run never leaves a half-written cache behind.
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            torch.save(tensors, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch reports a failed write (a file size limit) as RuntimeError
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        warnings.warn(f"could not cache decoded images in {path.parent} ({exc}); the next run decodes again", stacklevel=3)


def _load_folder(path: Path, name: str, skip_bad: bool = False) -> Dataset:
    """A ``train/<class>/…``, ``test/<class>/…`` tree from a directory or an archive, via the cache."""
    if path.is_dir():
        contents = _read_directory(path)
        content = _hash_contents(contents)
    elif path.is_file() and is_archive(path):
        contents, content = None, _hash_file(path)
    elif path.exists():
        raise UserError(f"{path} is neither a folder nor a .tar, .tar.gz, .tgz or .zip archive; check the folder:PATH")
    else:
        raise UserError(f"{path} does not exist; check the folder:PATH (it may be a folder or a .tar.gz/.zip archive)")

    cache_file = _cache_path(_cache_key(content) + ("-skip-bad" if skip_bad else ""))
    tensors = _read_cache(cache_file)
    if tensors is None:
        if contents is None:
            extensions = _image_extensions()
            contents = read_archive(path, keep=lambda rel: _is_candidate(rel, extensions))
        tensors = _decode_folder(contents, path, skip_bad)
        _write_cache(cache_file, tensors)
    return Dataset(
        name=name,
        classes=list(tensors["classes"]),
        train_x=tensors["train_x"],
        train_y=tensors["train_y"],
        test_x=tensors["test_x"],
        test_y=tensors["test_y"],
        skipped=list(tensors.get("skipped", [])),
        fingerprint=content,
    )
