"""The decoded-pixel cache: one raw uint8 array file per split, read a batch at a time by index.

One entry, ``cache_dir()/datasets/KEY/``, holds for each split ``SPLIT.u8`` (uint8 pixels, shape
(N, C, H, W), one image after another) and ``SPLIT.labels`` (int64, little-endian), and an
``index.json`` with the classes, what the source wants remembered, and each file's size and
SHA-256. An entry is written into a temporary folder beside it and renamed into place only when
complete, so a process killed while building leaves a folder no reader opens (the next build of
the same key deletes it). Opening an entry compares every file with its index first; a file of the
wrong size or checksum gets the entry rebuilt, never read. A pixel file is a plain C-order array, so
``np.memmap(path, np.uint8, "r", shape=index["splits"][split]["shape"])`` maps it for other tools.

:class:`PixelStore` presents a split (or a subset of one) the way the trainer and
:func:`cnnlab.core.metrics.score` use a tensor: ``len``, ``shape``, indexing by slices and index
tensors, ``.to(device)``. Indexing reads just those images from the file onto the store's device, so
a dataset larger than the memory trains with resident memory bounded by a few batches, and what
memory there is serves as page cache.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write

log = logging.getLogger(__name__)

FORMAT = 1  # of index.json and the files beside it
HASH_BLOCK = 4 * 2**20
READ_BYTES = 32 * 2**20  # what ``read`` copies at a time through a subset
# Reads of one batch in flight at once: a disk (a virtual one above all) serves several random reads
# in about the time of one (64 cold 147 KB rows: 72 ms one after another, 35 ms with 16 threads).
READ_THREADS = 8
PREFETCH = 3  # batches read ahead by the background thread
SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota


def cache_dir() -> Path:
    """Root of cnnlab's caches: $CNNLAB_CACHE or ~/.cache/cnnlab."""
    env = os.environ.get("CNNLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cnnlab"


def entries_dir() -> Path:
    return cache_dir() / "datasets"


def memory_budget_bytes() -> int:
    """How many bytes of decoded pixels may be held in memory: half of the RAM, or of this process's
    memory cgroup limit when that is lower (a container, ``systemd-run -p MemoryMax=``)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not available on this platform
        total = 16 * 2**30
    limit = _cgroup_limit()
    return min(total, limit if limit else total) // 2


def _cgroup_limit() -> int | None:
    """This process's memory cgroup limit in bytes (cgroup v2 or v1), None when unlimited or unknown.

    Inside a container /proc/self/cgroup may name the path as the host sees it while /sys/fs/cgroup
    shows the container's part of the tree: the path is tried with its leading parts dropped.
    """
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root, name = Path("/sys/fs/cgroup"), "memory.max"
        elif "memory" in controllers.split(","):
            root, name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for skip in range(len(parts) + 1):
            try:
                text = root.joinpath(*parts[skip:], name).read_text().strip()
            except OSError:
                continue
            # v1 spells "no limit" as a huge number, v2 as "max".
            return int(text) if text.isdigit() and int(text) < 2**60 else None
    return None


# --- writing ---------------------------------------------------------------------------------------


class _FileWriter:
    """A file written front to back, hashed as it goes."""

    def __init__(self, path: Path) -> None:
        self.path, self.file, self.digest, self.size = path, open(path, "wb"), hashlib.sha256(), 0

    def write(self, array: np.ndarray) -> None:
        view = memoryview(np.ascontiguousarray(array)).cast("B")
        self.file.write(view)
        self.digest.update(view)
        self.size += len(view)

    def close(self) -> dict[str, Any]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"file": self.path.name, "bytes": self.size, "sha256": self.digest.hexdigest()}


class SplitWriter:
    """Appends images and labels of one split to its files."""

    def __init__(self, folder: Path, name: str, image_shape: tuple[int, int, int]) -> None:
        self.image_shape = tuple(int(s) for s in image_shape)
        self.pixels = _FileWriter(folder / f"{name}.u8")
        self.labels = _FileWriter(folder / f"{name}.labels")
        self.count = 0

    def append(self, pixels: np.ndarray, labels: Iterable[int]) -> None:
        labels = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels, dtype="<i8")
        if pixels.dtype != np.uint8 or pixels.shape[1:] != self.image_shape or len(pixels) != len(labels):
            raise ValueError(f"expected uint8 images of {self.image_shape} with one label each, got "
                             f"{pixels.dtype} {pixels.shape} and {len(labels)} labels")
        self.pixels.write(pixels)
        self.labels.write(labels)
        self.count += len(pixels)

    def close(self) -> dict[str, Any]:
        return {"shape": [self.count, *self.image_shape], "pixels": self.pixels.close(), "labels": self.labels.close()}


class EntryBuilder:
    """Where a source writes its splits while an entry is being built."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writers: dict[str, SplitWriter] = {}

    def reserve(self, nbytes: int) -> None:
        """Refuse, before decoding anything, a dataset the cache's disk has no room for."""
        _check_space(self.folder, nbytes)

    def split(self, name: str, image_shape: tuple[int, int, int]) -> SplitWriter:
        self.writers[name] = SplitWriter(self.folder, name, image_shape)
        return self.writers[name]

    def abort(self) -> None:
        """Close every file, whatever they hold: the entry is being thrown away. On a full disk, closing
        a file whose buffer still holds bytes fails again; that must not keep the folder from going."""
        for writer in self.writers.values():
            for file in (writer.pixels.file, writer.labels.file):
                with contextlib.suppress(OSError):
                    file.close()

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        index = {"format": FORMAT, "meta": meta, "splits": {n: w.close() for n, w in self.writers.items()}}
        atomic_write(self.folder / "index.json", json.dumps(index, indent=1))  # last: it marks the entry complete
        return index


# --- the cache -------------------------------------------------------------------------------------


@dataclass
class Entry:
    """A complete, checked cache entry."""

    folder: Path
    index: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        return self.index["meta"]

    def pixels(self, split: str) -> PixelStore:
        info = self.index["splits"][split]
        return PixelStore(self.folder / info["pixels"]["file"], tuple(info["shape"]))

    def labels(self, split: str) -> torch.Tensor:
        info = self.index["splits"][split]
        data = (self.folder / info["labels"]["file"]).read_bytes()
        return torch.from_numpy(np.frombuffer(data, dtype="<i8").astype(np.int64))


def cached(key: str, build: Callable[[EntryBuilder], dict[str, Any]]) -> Entry:
    """The cache entry ``key``, built first by ``build`` (which writes the splits and returns the meta)
    when it is missing or damaged. Builds of one key are serialised across processes (torchrun ranks)."""
    root = entries_dir()
    final = root / key
    entry, problem = _open_entry(final)
    if entry is not None:
        return entry
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(root, e) from None
    try:
        with _locked(root / f".{key}.lock"):
            entry, problem = _open_entry(final)  # another process may have built it while we waited
            if entry is not None:
                return entry
            if problem is not None:
                log.warning(f"the cached dataset in {final} is damaged ({problem}); decoding it again")
            for stale in root.glob(f".{key}.*.tmp"):  # a build killed before its rename; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            return Entry(final, _build(root, key, build))
    except OSError as e:
        ours = e.filename is not None and str(e.filename).startswith(str(root))
        if not ours and e.errno not in SPACE_ERRORS + (errno.EROFS,):
            raise
        raise _unwritable(root, e) from None


def _build(root: Path, key: str, build: Callable[[EntryBuilder], dict[str, Any]]) -> dict[str, Any]:
    """Build entry ``key`` in a temporary folder and rename it into place; its index. However the build
    ends short (a full disk, a bad image, Ctrl-C), the temporary folder, as large as the data written so
    far, is removed."""
    tmp = root / f".{key}.{os.getpid()}.tmp"
    tmp.mkdir()
    builder = EntryBuilder(tmp)
    try:
        index = builder.finish(build(builder))
        final = root / key
        if final.exists():
            trash = root / f".{key}.{os.getpid()}.old.tmp"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        return index
    except BaseException:
        builder.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unwritable(root: Path, e: OSError) -> UserError:
    """The one line for a cache folder that cannot be written: where it is, and how to move it."""
    fix = ("free some space there, or set the environment variable CNNLAB_CACHE to a folder on a disk with room"
           if e.errno in SPACE_ERRORS else "set the environment variable CNNLAB_CACHE to a folder you can write")
    return UserError(f"cannot write the dataset cache in {root} ({e.strerror}); {fix}")


def _check_space(root: Path, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if needed > free:
        raise UserError(f"the decoded dataset needs {needed / 2**30:.1f} GiB in the cache {root}, which has "
                        f"{free / 2**30:.1f} GiB free; free some space, set the environment variable CNNLAB_CACHE "
                        "to a folder on another disk, or use a smaller `store_size`")


def _open_entry(folder: Path) -> tuple[Entry | None, str | None]:
    """The entry in ``folder`` if it is complete and every file matches its index; else why not (None if absent)."""
    index_path = folder / "index.json"
    if not index_path.is_file():
        return None, (f"{folder} has no index.json" if folder.exists() else None)
    try:
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT:
            return None, f"written by another version of cnnlab (format {index.get('format')})"
        for _split, info in index["splits"].items():
            n, c, h, w = info["shape"]
            for kind, expected in (("pixels", n * c * h * w), ("labels", 8 * n)):
                record = info[kind]
                if record["bytes"] != expected:
                    return None, f"index.json disagrees with itself about {record['file']}"
                problem = _check_file(folder / record["file"], record["bytes"], record["sha256"])
                if problem is not None:
                    return None, problem
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"unreadable index.json ({type(e).__name__}: {e})"
    return Entry(folder, index), None


def _check_file(path: Path, size: int, sha256: str) -> str | None:
    try:
        actual = path.stat().st_size
    except OSError:
        return f"{path.name} is missing"
    if actual != size:
        return f"{path.name} has {actual:,} bytes instead of {size:,}"
    digest = hashlib.sha256()
    block = bytearray(min(HASH_BLOCK, max(size, 1)))
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            digest.update(view[:n])
    if digest.hexdigest() != sha256:
        return f"{path.name} does not match its checksum"
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` that dies with the process (flock), where the platform has it."""
    try:
        import fcntl
    except ImportError:  # Windows: no concurrent builders to worry about in practice
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- reading ---------------------------------------------------------------------------------------


_READERS: ThreadPoolExecutor | None = None
_READERS_LOCK = threading.Lock()


def _readers() -> ThreadPoolExecutor:
    global _READERS
    with _READERS_LOCK:
        if _READERS is None:
            _READERS = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="cnnlab-read")
        return _READERS


def _forget_readers() -> None:
    global _READERS
    _READERS = None  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_readers)


class _File:
    """One split's file, read by position: any thread, any rows, straight into the caller's buffer.

    Positioned reads rather than a memory map: reading through a map makes every page-cache folio it
    touches part of the process's resident memory, and with large folios (Linux 6.x) one 192 KB image
    read at random mapped 0.9 MB, so a shuffled epoch over a large file grew the process by the file.
    A positioned read copies just the image, and the page cache keeps what memory allows, unaccounted.
    """

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.path, self.shape = path, tuple(shape)
        self.row_bytes = int(np.prod(shape[1:]))
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        weakref.finalize(self, os.close, self.fd)
        self.lock = threading.Lock()  # only where there is no pread and reads must seek
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)  # shuffled reads: read-ahead only wastes

    def read(self, rows: np.ndarray | slice, out: torch.Tensor) -> torch.Tensor:
        """The images at ``rows`` (file order or not) into ``out``, each run of consecutive rows in one read."""
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(self.shape[0])
            runs = [(start, 0, max(stop - start, 0))]
        else:
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            firsts = np.concatenate([[0], breaks]).astype(np.int64)
            lengths = np.diff(np.concatenate([firsts, [len(rows)]]))
            runs = list(zip(rows[firsts].tolist(), firsts.tolist(), lengths.tolist())) if len(rows) else []
        view = memoryview(out.numpy()).cast("B") if out.numel() else memoryview(b"")
        rb = self.row_bytes

        def read_runs(part: list[tuple[int, int, int]]) -> None:
            for row, at, count in part:
                self._pread(view[at * rb:(at + count) * rb], row * rb)

        if len(runs) < 2 * READ_THREADS:
            read_runs(runs)
        else:
            list(_readers().map(read_runs, [runs[i::READ_THREADS] for i in range(READ_THREADS)]))
        return out

    def _pread(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            if hasattr(os, "preadv"):
                n = os.preadv(self.fd, [view[done:]], offset + done)
            else:  # pragma: no cover - Windows
                with self.lock:
                    os.lseek(self.fd, offset + done, os.SEEK_SET)
                    n = os.readv(self.fd, [view[done:]])
            if n <= 0:
                raise OSError(f"{self.path} ended before byte {offset + len(view):,}; it was changed while in use")
            done += n


class PixelStore:
    """uint8 images (N, C, H, W) in a cache file, optionally a subset of its rows.

    Indexing returns a tensor of just those images on ``device`` (pinned and copied asynchronously
    on CUDA); ``batches`` reads a sequence of index batches ahead in a background thread.
    """

    dtype = torch.uint8

    def __init__(self, path: Path, shape: tuple[int, ...], rows: np.ndarray | None = None,
                 device: torch.device | str = "cpu", mapping: _File | None = None) -> None:
        self.path = Path(path)
        self.mapping = mapping if mapping is not None else _File(self.path, shape)
        self.rows = rows  # indices into the file, or None for all of it in order
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.mapping.shape[0] if self.rows is None else len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.mapping.shape[1:]))

    @property
    def nbytes(self) -> int:
        return len(self) * self.mapping.row_bytes

    def _view(self, rows: np.ndarray | None, device: torch.device | None = None) -> PixelStore:
        return PixelStore(self.path, self.mapping.shape, rows, device or self.device, self.mapping)

    def to(self, device: torch.device | str) -> PixelStore:
        """The same images, handed out on ``device``: nothing is read now."""
        return self if torch.device(device) == self.device else self._view(self.rows, torch.device(device))

    def subset(self, index: torch.Tensor | np.ndarray) -> PixelStore:
        """A view of the images at ``index`` (in that order)."""
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        return self._view(index if self.rows is None else self.rows[index])

    def tensor_split(self, sections: int) -> list[PixelStore]:
        """Contiguous views of nearly equal length, as ``torch.tensor_split`` (a rank's shard)."""
        return [self.subset(part) for part in np.array_split(np.arange(len(self)), sections)]

    def _file_rows(self, key: Any) -> np.ndarray | slice:
        if isinstance(key, slice):
            if self.rows is None and key.step in (None, 1):
                start, stop, _ = key.indices(len(self))
                return slice(start, max(start, stop))
            return (np.arange(len(self)) if self.rows is None else self.rows)[key]
        index = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key, dtype=np.int64)
        if index.size and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        index = np.where(index < 0, index + len(self), index)
        return index if self.rows is None else self.rows[index]

    def _gather(self, key: Any, pin: bool = False) -> torch.Tensor:
        rows = self._file_rows(key)
        n = len(range(*rows.indices(self.mapping.shape[0]))) if isinstance(rows, slice) else len(rows)
        out = torch.empty((n, *self.mapping.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        return self.mapping.read(rows, out)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.ndim == 0):
            return self[[int(key)]][0]
        pin = self.device.type == "cuda"
        return self._gather(key, pin).to(self.device, non_blocking=pin)

    def read(self) -> torch.Tensor:
        """All the images of this view in memory, as one contiguous CPU tensor."""
        out = torch.empty(self.shape, dtype=torch.uint8)
        if self.rows is None:
            return self.mapping.read(slice(0, len(self)), out)
        step = max(1, READ_BYTES // max(self.mapping.row_bytes, 1))
        for start in range(0, len(self), step):
            self.mapping.read(self.rows[start:start + step], out[start:start + step])
        return out

    def batches(self, indices: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The images of each index batch on ``device``, read ``PREFETCH`` batches ahead in a thread."""
        pin = self.device.type == "cuda"
        ready: queue.Queue = queue.Queue(maxsize=PREFETCH)
        stop = threading.Event()
        end = object()

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for index in indices:
                    if not put(self._gather(index, pin).to(self.device, non_blocking=pin)):
                        return
                put(end)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
                put(e)

        thread = threading.Thread(target=work, name="cnnlab-pixels", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


def take(x: torch.Tensor | PixelStore, index: torch.Tensor) -> torch.Tensor | PixelStore:
    """``x[index]``, as a view when ``x`` is a store (nothing is read)."""
    return x.subset(index) if isinstance(x, PixelStore) else x[index]

