"""Dataset sources: named datasets, image folders, archives and CSV lists, the bundled sample.

Every source becomes the same thing: an entry of the pixel cache (:mod:`cnnlab.data.store`), uint8
images (N, C, H, W) per split with int64 labels and the class names, keyed by the source's content.
Decoding is the slow part and happens once: in parallel, streamed into the cache a chunk at a time,
so that memory holds a few chunks whatever the size of the dataset. ``open_dataset`` hands the
splits out as :class:`~cnnlab.data.store.PixelStore` views of the cache files, read a batch at a
time; ``load_dataset`` reads them into tensors.

Images of a folder are stored at one size: as they are when they all share a size no larger than
the run's ``image_size``; else cropped to the centred square and resized (antialiased) to
``store_size`` if given, otherwise to the smaller of ``image_size`` and the median shorter side.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import statistics
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cnnlab.core import images
from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write
from cnnlab.data.archives import is_archive, member_limit, read_archive
from cnnlab.data.standard import NAMED, Arrays, checked
from cnnlab.data.store import Entry, EntryBuilder, PixelStore, cache_dir, cached, entries_dir, memory_budget_bytes

__all__ = ["DATASET_CHOICES", "NAMED_DATASETS", "Dataset", "cache_dir", "default_data_dir", "load_dataset",
           "memory_budget_bytes", "open_dataset"]

NAMED_DATASETS = tuple(NAMED)
DATASET_CHOICES = (*NAMED_DATASETS, "sample", "folder:PATH")

SAMPLE_ARCHIVE = Path(__file__).parent / "sample" / "cifar10-sample.tar.gz"

# Part of every cache key: bump it whenever decoding would give different pixels or labels.
DECODER_VERSION = 3  # 3: stored at the run's size, resized by torch's antialiased kernel
POOL_MIN_IMAGES = 4000  # below this a process pool costs more than it saves ...
POOL_MIN_BYTES = 256 * 2**20  # ... unless the decoded images are this large
POOL_CHUNK = 1000  # images per chunk at most ...
CHUNK_BYTES = 16 * 2**20  # ... and decoded bytes per chunk at most: what bounds the memory of a build
NAMED_CHUNK = 10_000  # images per write when a named dataset goes into the cache

_T = TypeVar("_T")  # what a chunk function returns

Source = bytes | Path  # an image's encoded bytes, or the file holding them


@dataclass
class Dataset:
    """A labelled dataset: uint8 pixels (N, C, H, W), in memory or in the cache's files."""

    name: str  # "cifar10", "sample", "folder:<path>", …
    classes: list[str]
    train_x: torch.Tensor | PixelStore  # C is 1 or 3
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor | PixelStore
    test_y: torch.Tensor
    skipped: list[str] = field(default_factory=list)  # unreadable images left out (--skip-bad-images)
    # sha256 of the source's content (files and folder names, or CIFAR-10's pixels and labels): a run
    # records it, and --resume refuses to continue on data that changed under the same class names.
    fingerprint: str = ""


def default_data_dir() -> Path:
    """Where named datasets are looked for (and downloaded): $CNNLAB_DATA or ~/.cache/cnnlab/data."""
    env = os.environ.get("CNNLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cnnlab" / "data"


def open_dataset(spec: str, data_dir: str | Path | None = None, download: bool = False,
                 skip_bad_images: bool = False, store_size: int | None = None,
                 image_size: int | None = None) -> Dataset:
    """The dataset named by ``spec`` (one of ``DATASET_CHOICES``), its pixels left in the cache files.

    An image that cannot be decoded stops the load with its name, unless ``skip_bad_images``: then
    it is left out and listed in ``Dataset.skipped``. ``store_size`` and ``image_size`` set the
    stored size of folder images (see the module's description).
    """
    if spec in NAMED:
        return _open_named(spec, Path(data_dir).expanduser() if data_dir else default_data_dir(), download)
    sizing = _Sizing(store_size, image_size)
    if spec == "sample":
        return _open_folder(SAMPLE_ARCHIVE, "sample", skip_bad_images, sizing)
    if spec.startswith("folder:"):
        location = spec[len("folder:"):]
        if not location:
            raise UserError("--dataset folder: needs a path, e.g. folder:~/images or folder:images.tar.gz")
        return _open_folder(Path(location).expanduser(), spec, skip_bad_images, sizing)
    raise UserError(f"unknown dataset {spec!r}: choose one of {', '.join(DATASET_CHOICES)}")


def load_dataset(spec: str, data_dir: str | Path | None = None, download: bool = False,
                 skip_bad_images: bool = False, store_size: int | None = None,
                 image_size: int | None = None) -> Dataset:
    """:func:`open_dataset`, with every split read into memory as a contiguous uint8 tensor."""
    data = open_dataset(spec, data_dir, download, skip_bad_images, store_size, image_size)
    data.train_x, data.test_x = data.train_x.read(), data.test_x.read()
    return data


def _from_entry(entry: Entry, name: str, fingerprint: str) -> Dataset:
    return Dataset(name, list(entry.meta["classes"]), entry.pixels("train"), entry.labels("train"),
                   entry.pixels("test"), entry.labels("test"), list(entry.meta.get("skipped", [])),
                   str(entry.meta.get("fingerprint", fingerprint)))


def _cache_key(content: str) -> str:
    """Decoded pixels depend on the content and on the decoder: both are in the cache key (the
    content hash alone is the data's fingerprint, which a new decoder does not change)."""
    return hashlib.sha256(f"cnnlab-decoder-{DECODER_VERSION}\0{content}".encode()).hexdigest()


def _hash_file(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; check its permissions") from None
    return digest.hexdigest()


def _hash_files(paths: Iterable[Path], salt: str) -> str:
    """sha256 of several files, each with its size, after ``salt`` (what kind of list they are)."""
    digest = hashlib.sha256(f"{salt}\0".encode())
    for path in paths:
        _hash_into(digest, path)
    return digest.hexdigest()


def _hash_arrays(arrays: Arrays) -> str:
    """sha256 of a named dataset's class names, pixels and labels: its fingerprint, whatever its files."""
    digest = hashlib.sha256("\0".join(arrays.classes).encode())
    for array in (*arrays.train, *arrays.test):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()


def _hash_into(digest: Any, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            digest.update(f"{os.fstat(f.fileno()).st_size}\0".encode())
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; check its permissions") from None


# --- named datasets ------------------------------------------------------------------------------


def _open_named(name: str, data_dir: Path, download: bool) -> Dataset:
    named = NAMED[name]
    files = named.find(data_dir)
    if files is None and download:
        named.fetch(data_dir)
        files = named.find(data_dir)
    if files is None:
        raise named.missing(data_dir)

    def build(builder: EntryBuilder) -> dict[str, Any]:
        arrays = checked(named.read(data_dir), named.title, named.where(data_dir))
        _write_arrays(builder, arrays)
        return {"classes": arrays.classes, "source": name, "fingerprint": _hash_arrays(arrays)}

    content = _hash_files(files, name)
    return _from_entry(cached(f"{name}-{_cache_key(content)}", build), name, content)


def _write_arrays(builder: EntryBuilder, arrays: Arrays) -> None:
    builder.reserve(sum(x.nbytes for x, _ in (arrays.train, arrays.test)))
    for split, (x, y) in (("train", arrays.train), ("test", arrays.test)):
        writer = builder.split(split, x.shape[1:])
        for start in range(0, len(x), NAMED_CHUNK):
            writer.append(x[start:start + NAMED_CHUNK], y[start:start + NAMED_CHUNK])


# --- image folders, archives and CSV lists -------------------------------------------------------


@dataclass(frozen=True)
class _Sizing:
    store_size: int | None  # every image at this square size
    image_size: int | None  # the network's input: images larger than it are stored at it


@dataclass
class _Layout:
    """Class names and, per split, (name for messages, image, label) in a fixed order.

    ``resolve`` turns a chunk's images into bytes or files where the layout holds references
    (rows of a Hugging Face dataset), a chunk at a time, before the chunk is handed to a worker.
    """

    classes: list[str]
    items: dict[str, list[tuple[str, Any, int]]]
    resolve: Callable[[list[tuple[str, Any]]], list[tuple[str, Source]]] | None = None

    def ready(self, chunk: list[tuple[str, Any]]) -> list[tuple[str, Source]]:
        return self.resolve(chunk) if self.resolve is not None else chunk

    def chunks(self, items: list[tuple[str, Any]], size: int) -> Iterator[list[tuple[str, Source]]]:
        return (self.ready(items[start:start + size]) for start in range(0, len(items), size))


@dataclass(frozen=True)
class _DecodePlan:
    """What every image becomes: its channel count and size, and whether it must be resized."""

    channels: int
    height: int
    width: int
    fit: bool

    @property
    def tag(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}{'-fit' if self.fit else ''}"


def _image_extensions() -> frozenset[str]:
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _is_hidden(part: str) -> bool:
    # macOS zips carry a __MACOSX/ tree of resource forks next to the real files.
    return part.startswith(".") or part == "__MACOSX"


def _is_candidate(relpath: str, extensions: frozenset[str]) -> bool:
    """Whether a file is an image we should decode: a PIL extension and no hidden path part."""
    parts = relpath.split("/")
    return not any(_is_hidden(p) for p in parts) and os.path.splitext(parts[-1])[1].lower() in extensions


class _Tree:
    """Files (their bytes, or the path to read them from) and folders, by relative POSIX path."""

    def __init__(self, files: dict[str, Source], dirs: set[str]) -> None:
        self.files, self.dirs = files, dirs


def _list_directory(root: Path) -> _Tree:
    """The images under ``root`` by path: nothing is read yet, so memory does not grow with the folder.

    Folders and files that are symbolic links are followed (datasets are often assembled from links);
    a link back into its own ancestry is refused. Each file is checked against the per-image size
    bound (:func:`~cnnlab.data.archives.member_limit`) before anything is read."""
    extensions = _image_extensions()
    tree = _Tree({}, set())
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
        tree.dirs.update(prefix + d for d in subdirs)
        for name in files:
            rel = prefix + name
            if _is_candidate(rel, extensions):
                path = Path(folder, name)
                try:
                    size = path.stat().st_size
                except OSError as exc:
                    raise UserError(f"cannot read {path}: {exc.strerror}; check that it exists and "
                                    "its permissions") from None
                if size > limit:
                    raise UserError(f"{path} is {size / 2**20:,.0f} MiB, more than any image cnnlab reads "
                                    f"({limit / 2**20:,.0f} MiB, see CNNLAB_MAX_IMAGE_BYTES); remove it")
                tree.files[rel] = path
    return tree


def _hash_tree(tree: _Tree) -> str:
    """Content hash of a directory tree (its layout and image bytes), read one file at a time."""
    digest = hashlib.sha256()
    for d in sorted(tree.dirs):  # empty class folders change the outcome too
        digest.update(f"d\0{d}\0".encode())
    for rel in sorted(tree.files):
        digest.update(f"f\0{rel}\0".encode())
        source = tree.files[rel]
        if isinstance(source, Path):
            _hash_into(digest, source)
        else:
            digest.update(f"{len(source)}\0".encode())
            digest.update(source)
    return digest.hexdigest()


def _strip_single_top(tree: _Tree) -> _Tree:
    """Accept ``top/train/...`` as if it were ``train/...`` when one folder holds everything."""
    tops = {rel.split("/", 1)[0] for rel in tree.files}
    if len(tops) != 1 or tops & {"train", "test"} or not all("/" in rel for rel in tree.files):
        return tree
    prefix = tops.pop() + "/"
    return _Tree({rel[len(prefix):]: data for rel, data in tree.files.items()},
                 {d[len(prefix):] for d in tree.dirs if d.startswith(prefix)})


def _tree_layout(tree: _Tree, source: Path) -> _Layout:
    """Class names (sorted train folders) and, per split, the images in path order."""
    tree = _strip_single_top(tree)
    layout_hint = "expected train/<class>/<images> and test/<class>/<images>"
    per_split: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for d in tree.dirs:
        parts = d.split("/")
        if len(parts) >= 2 and parts[0] in per_split and not _is_hidden(parts[1]):
            per_split[parts[0]].setdefault(parts[1], [])
    for rel in sorted(tree.files):
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
        raise UserError(f"{source}: test classes {', '.join(extra)} have no train/ folder; "
                        "add them to train/ or remove them from test/")
    index = {cls: i for i, cls in enumerate(classes)}
    items = {split: [(rel, tree.files[rel], index[cls])
                     for rel, cls in sorted((rel, cls) for cls, files in folders.items() for rel in files)]
             for split, folders in per_split.items()}
    return _Layout(classes, items)


CSV_HINT = "a CSV needs a header row with path and label columns, and a split column (train or test) " \
           "unless it is train.csv or test.csv beside the other"


def _csv_files(path: Path) -> list[tuple[Path, str | None]] | None:
    """The CSV lists a ``folder:`` path names: one CSV with a split column, or train.csv and test.csv."""
    if path.is_file() and path.suffix.lower() == ".csv":
        return [(path, None)]
    if path.is_dir() and not (path / "train").is_dir() and (path / "train.csv").is_file():
        return [(path / "train.csv", "train"), (path / "test.csv", "test")]
    return None


def _csv_rows(files: list[tuple[Path, str | None]]) -> list[tuple[str, Path, str, str]]:
    """(name for messages, image path, label, split) for every row of the CSV files."""
    rows = []
    for path, fixed_split in files:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise UserError(f"{path} does not exist; {CSV_HINT}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path} ({e}); it must be a UTF-8 CSV file") from None
        reader = csv.reader(io.StringIO(text))
        header = [h.strip().lower() for h in next(reader, [])]
        if "path" not in header or "label" not in header or (fixed_split is None and "split" not in header):
            raise UserError(f"{path}: header {','.join(header) or '(none)'}: {CSV_HINT}")
        columns = {name: header.index(name) for name in ("path", "label", "split") if name in header}
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise UserError(f"{path}, line {line}: {len(row)} values for {len(header)} columns")
            split = fixed_split or row[columns["split"]].strip().lower()
            if split not in ("train", "test"):
                raise UserError(f"{path}, line {line}: split {row[columns['split']]!r} is neither train nor test")
            rel, label = row[columns["path"]].strip(), row[columns["label"]].strip()
            if not rel or not label:
                raise UserError(f"{path}, line {line}: an empty path or label")
            rows.append((rel, (path.parent / rel).expanduser(), label, split))
    return rows


def _csv_layout(rows: list[tuple[str, Path, str, str]], source: Path) -> _Layout:
    classes = sorted({label for _, _, label, split in rows if split == "train"})
    for split in ("train", "test"):
        if not any(s == split for *_, s in rows):
            raise UserError(f"{source}: the {split} split has no rows; {CSV_HINT}")
    extra = sorted({label for _, _, label, split in rows if split == "test"} - set(classes))
    if extra:
        raise UserError(f"{source}: test labels {', '.join(extra)} have no training images")
    index = {cls: i for i, cls in enumerate(classes)}
    return _Layout(classes, {split: [(rel, path, index[label]) for rel, path, label, s in rows if s == split]
                             for split in ("train", "test")})


HF_EXTRA = "pip install 'cnnlab[hf]'"


def _is_hf_dataset(path: Path) -> bool:
    """A Hugging Face ``DatasetDict`` written with ``save_to_disk``."""
    return path.is_dir() and (path / "dataset_dict.json").is_file()


def _hf_layout(path: Path) -> _Layout:
    """The train and test splits of a saved ``DatasetDict``: its first Image column and its first ClassLabel."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path} is a Hugging Face dataset; "
                        f"reading it needs the datasets package: {HF_EXTRA}") from None
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises many kinds for a damaged folder
        raise UserError(f"cannot read the Hugging Face dataset {path} ({type(e).__name__}: {e})") from None
    if not isinstance(saved, datasets.DatasetDict) or not {"train", "test"} <= set(saved):
        found = ", ".join(saved) if isinstance(saved, datasets.DatasetDict) else "a single split"
        raise UserError(f"{path}: a Hugging Face dataset needs train and test splits (it has {found})")
    features = saved["train"].features
    image = next((n for n, f in features.items() if isinstance(f, datasets.Image)), None)
    label = next((n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image is None or label is None:
        raise UserError(f"{path}: a Hugging Face dataset needs an Image column and a ClassLabel column "
                        f"(it has {', '.join(f'{n}: {type(f).__name__}' for n, f in features.items())})")
    classes = list(features[label].names)
    saved = saved.cast_column(image, datasets.Image(decode=False))  # encoded bytes: our decoder decodes
    items: dict[str, list[tuple[str, Any, int]]] = {}
    for split in ("train", "test"):
        labels = saved[split][label]
        if any(not 0 <= y < len(classes) for y in labels):
            raise UserError(f"{path}: the {split} split has rows without a label in 0…{len(classes) - 1}")
        items[split] = [(f"{split}[{i}]", (split, i), int(y)) for i, y in enumerate(labels)]

    def resolve(chunk: list[tuple[str, Any]]) -> list[tuple[str, Source]]:
        out: list[tuple[str, Source]] = []
        for split in ("train", "test"):
            rows = [(name, ref[1]) for name, ref in chunk if ref[0] == split]
            if rows:
                cells = saved[split].select([i for _, i in rows])[image]
                out += [(name, cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"]))
                        for (name, _), cell in zip(rows, cells)]
        order = {name: k for k, (name, _) in enumerate(chunk)}
        return sorted(out, key=lambda item: order[item[0]])

    return _Layout(classes, items, resolve)


class _FolderSource:
    """A folder, an archive, a CSV list or a saved Hugging Face dataset: its content key now, its
    layout only if it must be decoded."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hf = _is_hf_dataset(path)
        self.csv = None if self.hf else _csv_files(path)
        if self.csv is None and not path.is_dir():
            if path.is_file() and not is_archive(path):
                raise UserError(f"{path} is neither a folder, a .csv list nor a .tar, .tar.gz, .tgz or .zip archive; "
                                "check the folder:PATH")
            if not path.exists():
                raise UserError(f"{path} does not exist; check the folder:PATH (it may be a folder, a .csv list "
                                "or a .tar.gz/.zip archive)")
        self._tree: _Tree | None = None
        self._rows: list[tuple[str, Path, str, str]] | None = None

    def content(self) -> str:
        """The content hash: the run's data fingerprint, and with the decoder's version the cache key."""
        if self.hf:
            return _hash_tree(_Tree({p.relative_to(self.path).as_posix(): p for p in sorted(self.path.rglob("*"))
                                     if p.is_file()}, set()))
        if self.csv is not None:
            self._rows = _csv_rows(self.csv)
            lists = _hash_files([p for p, _ in self.csv], "csv")
            return _hash_files([p for _, p, _, _ in self._rows if p.is_file()], lists)
        if self.path.is_dir():
            self._tree = _list_directory(self.path)
            return _hash_tree(self._tree)
        return _hash_file(self.path)

    def layout(self) -> _Layout:
        if self.hf:
            return _hf_layout(self.path)
        if self.csv is not None:
            return _csv_layout(self._rows if self._rows is not None else _csv_rows(self.csv), self.path)
        if self._tree is None:
            if self.path.is_dir():
                self._tree = _list_directory(self.path)
            else:  # archives are read into memory as they are checked (cnnlab.data.archives)
                extensions = _image_extensions()
                contents = read_archive(self.path, keep=lambda rel: _is_candidate(rel, extensions))
                self._tree = _Tree(dict(contents.files), set(contents.dirs))
        return _tree_layout(self._tree, self.path)


def _open_folder(path: Path, name: str, skip_bad: bool, sizing: _Sizing) -> Dataset:
    """A ``train/<class>/…``, ``test/<class>/…`` tree, archive or CSV list, via the cache."""
    source = _FolderSource(path)
    content = source.content()
    base = _cache_key(content) + ("-skip-bad" if skip_bad else "")
    prepared: dict[str, Any] = {}

    def prepare() -> dict[str, Any]:
        if not prepared:
            prepared.update(_probe_layout(source.layout(), path, skip_bad))
        return prepared

    summary_path = entries_dir() / f"{base}.probe.json"
    summary = _read_summary(summary_path)
    if summary is None:
        summary = prepare()["summary"]
        try:
            atomic_write(summary_path, json.dumps(summary))
        except OSError:
            pass  # only saves the header pass next time; the entry itself says what is wrong with the cache
    plan = _plan(summary, sizing)

    def build(builder: EntryBuilder) -> dict[str, Any]:
        state = prepare()
        return _decode_into(builder, state["layout"], plan, path, skip_bad, state["skipped"])

    return _from_entry(cached(f"{base}-{plan.tag}", build), name, content)


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads(path.read_text())
        return summary if {"channels", "uniform", "median_short"} <= set(summary) else None
    except (OSError, ValueError, TypeError):
        return None


def _plan(summary: dict[str, Any], sizing: _Sizing) -> _DecodePlan:
    channels, uniform = int(summary["channels"]), summary["uniform"]
    if sizing.store_size is not None:
        side = sizing.store_size
        return _DecodePlan(channels, side, side, fit=uniform != [side, side])
    if uniform is not None and (sizing.image_size is None or max(uniform) <= sizing.image_size):
        width, height = uniform
        return _DecodePlan(channels, height, width, fit=False)
    side = int(summary["median_short"]) if uniform is None else min(uniform)
    if sizing.image_size is not None:
        side = min(side, sizing.image_size)
    return _DecodePlan(channels, side, side, fit=True)


def _probe(rel: str, data: Source, source: str) -> tuple[str, int, int]:
    """Mode, width and height from the image header, without decoding pixels."""
    try:
        return images.header(data)
    except images.DECODE_ERRORS as exc:
        raise UserError(f"{source}: cannot read image {rel} ({exc}); remove or replace the file, "
                        "or pass --skip-bad-images to leave such files out") from None


def _probe_chunk(items: list[tuple[str, Source]], source: str, skip_bad: bool) -> list[tuple[str, int, int] | None]:
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


def _probe_layout(layout: _Layout, source: Path, skip_bad: bool) -> dict[str, Any]:
    """The cheap pass: headers only, to settle channels and size before any pixel is decoded."""
    skipped: list[str] = []
    modes, sizes = set(), []
    everything = [(rel, data) for split in ("train", "test") for rel, data, _ in layout.items[split]]
    with _executor(len(everything), 0) as (pool, window):
        chunks = layout.chunks(everything, POOL_CHUNK)
        headers = [h for chunk in _map_chunks(_probe_chunk, chunks, pool, window, str(source), skip_bad) for h in chunk]
    start = 0
    for split in ("train", "test"):
        items = layout.items[split]
        kept = []
        for item, header in zip(items, headers[start:start + len(items)]):
            if header is None:
                skipped.append(item[0])
                continue
            kept.append(item)
            modes.add(header[0])
            sizes.append(header[1:])
        start += len(items)
        layout.items[split] = kept
    _check_not_emptied(layout, source)
    channels = 1 if modes <= images.GRAY_MODES else 3
    uniform = list(sizes[0]) if len(set(sizes)) == 1 else None
    median_short = statistics.median_low(min(w, h) for w, h in sizes)
    return {"layout": layout, "skipped": skipped,
            "summary": {"channels": channels, "uniform": uniform, "median_short": median_short}}


def _decode_chunk(items: list[tuple[str, Source]], plan: _DecodePlan, source: str,
                  skip_bad: bool) -> tuple[np.ndarray, list[int]]:
    """Decode a list of (path, bytes or file) into one (n, C, H, W) array; runs in worker processes too.

    Also returns the indices of images that failed (only with ``skip_bad``; else the first stops it).
    """
    out = np.empty((len(items), plan.channels, plan.height, plan.width), dtype=np.uint8)
    failed = []
    for i, (rel, data) in enumerate(items):
        try:
            out[i] = images.decode(data, plan.channels, fit=(plan.width, plan.height) if plan.fit else None)
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
def _one_torch_thread() -> Iterator[None]:
    """One image is too small a job for a thread team: with two, they mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core already; resizes are small


@contextmanager
def _executor(total: int, total_bytes: int) -> Iterator[tuple[Executor | None, int]]:
    """A process pool, and how many chunks may be in flight, for big sets where fork is available.

    Only from the main thread: a fork from any other thread copies locks that other threads (torch's,
    the server's) may hold at that moment, and the child can hang on them forever. Elsewhere the
    images are decoded in this process."""
    workers = _worker_count()
    big = total >= POOL_MIN_IMAGES or total_bytes >= POOL_MIN_BYTES
    main = threading.current_thread() is threading.main_thread()
    if not big or workers < 2 or sys.platform != "linux" or not main:
        yield None, 1
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init)
    try:
        yield pool, 2 * workers
    finally:
        # After a bad image there is no point finishing the other chunks.
        pool.shutdown(wait=True, cancel_futures=True)


def _map_chunks(fn: Callable[..., _T], chunks: Iterable[list[Any]], pool: Executor | None, window: int,
                *args: object) -> Iterator[_T]:
    """``fn(chunk, *args)`` over ``chunks``, in order; in the pool with at most ``window`` chunks in flight,
    so that results waiting to be written never pile up beyond a few chunks."""
    if pool is None:
        for chunk in chunks:
            yield fn(chunk, *args)
        return
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.submit(fn, chunk, *args))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _decode_into(builder: EntryBuilder, layout: _Layout, plan: _DecodePlan, source: Path, skip_bad: bool,
                 skipped: list[str]) -> dict[str, Any]:
    """Decode both splits into the entry a chunk at a time; images that fail (``skip_bad``) are left out."""
    row_bytes = plan.channels * plan.height * plan.width
    total = sum(len(items) for items in layout.items.values())
    builder.reserve(total * row_bytes)
    per_chunk = max(1, min(POOL_CHUNK, CHUNK_BYTES // row_bytes))
    skipped = list(skipped)
    with _executor(total, total * row_bytes) as (pool, window), _one_torch_thread(), \
            tqdm(total=total, desc=f"decoding {source.name}", unit="img", file=sys.stderr, leave=False,
                 disable=not sys.stderr.isatty()) as bar:
        for split in ("train", "test"):
            items = layout.items[split]
            writer = builder.split(split, (plan.channels, plan.height, plan.width))
            chunks = [items[i:i + per_chunk] for i in range(0, len(items), per_chunk)]
            work = (layout.ready([(rel, data) for rel, data, _ in chunk]) for chunk in chunks)
            kept = []
            for chunk, (decoded, bad) in zip(chunks, _map_chunks(_decode_chunk, work, pool, window, plan,
                                                                  str(source), skip_bad)):
                keep = [i for i in range(len(chunk)) if i not in set(bad)]
                writer.append(decoded[keep] if bad else decoded, [chunk[i][2] for i in keep])
                skipped += [chunk[i][0] for i in bad]
                kept += [chunk[i] for i in keep]
                bar.update(len(chunk))
            layout.items[split] = kept
    # Images whose header read fine but whose pixels did not (e.g. truncated files) may empty a class.
    _check_not_emptied(layout, source)
    return {"classes": layout.classes, "skipped": skipped, "source": str(source)}


def _check_not_emptied(layout: _Layout, source: Path) -> None:
    """After leaving bad images out, every train class and the test split must still have images."""
    present = {label for _, _, label in layout.items["train"]}
    emptied = [c for i, c in enumerate(layout.classes) if i not in present]
    if emptied:
        raise UserError(f"{source}: no readable training images are left in class {', '.join(emptied)}; "
                        "replace the unreadable files")
    if not layout.items["test"]:
        raise UserError(f"{source}: no readable test images are left; replace the unreadable files")
