"""Datasets by name: CIFAR-10, CIFAR-100, MNIST, Fashion-MNIST, SVHN and STL-10.

Each is found in ``--data-dir`` in the layout its official download has (``--download`` fetches it
with torchvision, whose downloads check their MD5), read once into memory (the largest, STL-10, is
360 MB of pixels) and written into the pixel cache, keyed by the content of its files.

MNIST, Fashion-MNIST, SVHN and STL-10 are read through torchvision's dataset classes. The CIFAR
files are Python pickles, and torchvision unpickles them with plain ``pickle.load``, which runs
whatever code a tampered file names; they are read here with a restricted unpickler instead.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnlab.core.errors import UserError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR100_FOLDER = "cifar-100-python"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SVHN_FOLDER = "svhn"
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
STL10_FOLDER = "stl10_binary"
STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")


@dataclass
class Arrays:
    """A whole named dataset in memory: uint8 (N, C, H, W) images and int64 labels per split."""

    classes: list[str]
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Named:
    """How to find, fetch and read one named dataset under a data folder."""

    name: str
    title: str  # as people write it, for messages
    where: Callable[[Path], Path]  # the folder its files are in
    files: tuple[str, ...]  # in that folder; their content keys the cache
    fetch: Callable[[Path], None]
    read: Callable[[Path], Arrays]

    def find(self, data_dir: Path) -> list[Path] | None:
        folder = self.where(data_dir)
        paths = [folder / f for f in self.files]
        return paths if all(p.is_file() for p in paths) else None

    def missing(self, data_dir: Path) -> UserError:
        return UserError(f"{self.title} not found in {self.where(data_dir)} (looked for {', '.join(self.files)}): "
                         "pass `download` to fetch it, or point `data_dir` at the folder that holds it")


# --- CIFAR ---------------------------------------------------------------------------------------


class _Ndarray:
    """What a pickle's ``numpy.ndarray`` stands for: only an argument of ``_reconstruct``, never called."""


class _PickledDtype:
    """A pickle's ``numpy.dtype(name, align, copy)``, kept to a plain numeric type of a few bytes."""

    def __init__(self, name: object, align: object = False, copy: object = False) -> None:
        text = name.decode("latin1") if isinstance(name, bytes) else name
        try:
            self.dtype = np.dtype(text) if isinstance(text, str) and len(text) <= 4 else None
        except TypeError:
            self.dtype = None
        if self.dtype is None or self.dtype.kind not in "biuf":
            raise pickle.UnpicklingError(f"holds an array of type {name!r}, not the numbers a CIFAR file holds")

    def __setstate__(self, state: object) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        order = order.decode("latin1") if isinstance(order, bytes) else order
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


def _shape(shape: object, dtype: object, nbytes: int) -> tuple[tuple[int, ...], np.dtype]:
    """``shape`` and the numpy dtype, checked to describe exactly the ``nbytes`` bytes the file holds."""
    if not isinstance(dtype, _PickledDtype):
        raise pickle.UnpicklingError("holds an array without a plain numeric type")
    if not (isinstance(shape, tuple) and len(shape) <= 8 and all(type(n) is int and n >= 0 for n in shape)):
        raise pickle.UnpicklingError(f"holds an array of shape {shape!r}")
    if int(np.prod(shape, dtype=object)) * dtype.dtype.itemsize != nbytes:
        raise pickle.UnpicklingError(f"holds an array of shape {shape} whose {nbytes:,} bytes do not match it")
    return shape, dtype.dtype


class _PickledArray:
    """A pickle's ``_reconstruct(ndarray, (0,), 'b')``; its ``__setstate__`` brings the shape, type and bytes,
    checked against each other before numpy sees them (its own checks trust the type)."""

    def __init__(self, cls: object, shape: object, typecode: object) -> None:
        if not isinstance(cls, _Ndarray):
            raise pickle.UnpicklingError("rebuilds something other than a numpy array")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 4:  # numpy before 1.0 wrote no version
            state = (1, *state)
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[4], bytes)):
            raise pickle.UnpicklingError("holds an array whose data is not plain bytes")
        shape, dtype = _shape(state[1], state[2], len(state[4]))
        array = np.ndarray((0,), np.uint8)
        array.__setstate__((1, shape, dtype, bool(state[3]), state[4]))  # as numpy's unpickling, checked input
        self.array = array


def _frombuffer(buf: object, dtype: object, shape: object, order: object) -> np.ndarray:
    """A pickle's ``numpy._core.numeric._frombuffer`` (protocol 5), checked as :class:`_PickledArray` is."""
    if not isinstance(buf, bytes | bytearray):
        raise pickle.UnpicklingError("holds an array whose data is not plain bytes")
    shape, dt = _shape(shape, dtype, len(buf))
    return np.frombuffer(buf, dtype=dt).reshape(shape, order="F" if order in ("F", b"F") else "C")


def _latin1(text: object, encoding: object = "latin1") -> bytes:
    """A pickle's ``_codecs.encode(str, 'latin1')``: how protocol 2 spells a bytes object."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("encodes text other than the way pickle writes bytes")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    """A pickle's ``bytes()``: how protocol 2 spells an empty bytes object (never with an argument)."""
    return b""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for what the CIFAR files hold (dicts, lists, bytes, numbers and numpy arrays), and nothing else.

    The CIFAR files are pickles, and a pickle can run any code it names, or ask for any amount of
    memory (``bytearray(10**12)``, an array of any shape); only the globals the format needs are let
    through, and each as a stand-in that takes the arguments pickle itself writes and sizes no larger
    than the bytes in the file, so a tampered file fails instead of executing or exhausting memory.
    """

    _ALLOWED = {
        **dict.fromkeys([("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")],
                        _PickledArray),
        **dict.fromkeys([("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")],
                        _frombuffer),
        ("numpy", "ndarray"): _Ndarray(),
        ("numpy", "dtype"): _PickledDtype,
        ("builtins", "bytes"): _empty_bytes,
        ("__builtin__", "bytes"): _empty_bytes,  # protocol 2's spelling: find_class sees the name as written
        ("_codecs", "encode"): _latin1,
    }

    def find_class(self, module: str, name: str) -> object:
        allowed = self._ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR file never needs")
        return allowed


def _read_cifar_pickle(path: Path, title: str = "CIFAR-10") -> dict[str, object]:
    """One CIFAR batch or meta file as a dict with str keys, read with the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            content = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            MemoryError) as exc:  # MemoryError: a length field beyond any memory, before the data is missed
        raise UserError(f"{path} is not a valid {title} file ({exc or type(exc).__name__}); delete it and rerun "
                        "with `download`") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a valid {title} file (no dict inside); delete it and rerun with `download`")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v.array if isinstance(v, _PickledArray) else v
            for k, v in content.items()}


def _read_cifar_batch(path: Path, label_key: str = "labels", title: str = "CIFAR-10") -> tuple[np.ndarray, np.ndarray]:
    batch = _read_cifar_pickle(path, title)
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path} has no N×3072 uint8 'data' array; delete it and rerun with `download`")
    labels_arr = np.asarray(labels, dtype=np.int64) if isinstance(labels, list | np.ndarray) else None
    if labels_arr is None or labels_arr.shape != (data.shape[0],):
        raise UserError(f"{path} has no '{label_key}' list matching its images; delete it and rerun with `download`")
    # Rows hold the R, G and B planes one after another, each 32×32 row-major.
    return data.reshape(-1, 3, 32, 32), labels_arr


def _class_names(path: Path, key: str, title: str) -> list[str]:
    names = _read_cifar_pickle(path, title).get(key)
    if not isinstance(names, list) or not names:
        raise UserError(f"{path} has no '{key}'; delete it and rerun with `download`")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _cifar10_folder(data_dir: Path) -> Path:
    # The official archive unpacks into cifar-10-batches-py; its files straight in `data_dir` work too.
    needed = (*CIFAR10_TRAIN_BATCHES, "test_batch", "batches.meta")
    if not (data_dir / CIFAR10_FOLDER).is_dir() and all((data_dir / name).is_file() for name in needed):
        return data_dir
    return data_dir / CIFAR10_FOLDER


def _read_cifar10(data_dir: Path) -> Arrays:
    folder = _cifar10_folder(data_dir)
    classes = _class_names(folder / "batches.meta", "label_names", "CIFAR-10")
    train = [_read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_BATCHES]
    test = _read_cifar_batch(folder / "test_batch")
    return Arrays(classes, (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])), test)


def _read_cifar100(data_dir: Path) -> Arrays:
    folder = data_dir / CIFAR100_FOLDER
    classes = _class_names(folder / "meta", "fine_label_names", "CIFAR-100")
    return Arrays(classes, _read_cifar_batch(folder / "train", "fine_labels", "CIFAR-100"),
                  _read_cifar_batch(folder / "test", "fine_labels", "CIFAR-100"))


def _download_archive(url: str, md5: str, data_dir: Path, title: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive  # only for `download`

    try:
        download_and_extract_archive(url, download_root=str(data_dir), md5=md5)
    except (OSError, RuntimeError) as exc:  # network failure, or torchvision's checksum mismatch
        raise _download_failed(title, data_dir, exc) from None


def _download_failed(title: str, data_dir: Path, exc: BaseException) -> UserError:
    return UserError(f"could not download {title} into {data_dir} ({exc}); download it by hand and pass "
                     "`data_dir`, or use `dataset` folder:PATH or `dataset` sample")


def _fetch_cifar100(data_dir: Path) -> None:
    from torchvision.datasets import CIFAR100  # for its address and checksum only: it is not used to read

    _download_archive(CIFAR100.url, CIFAR100.tgz_md5, data_dir, "CIFAR-100")


# --- through torchvision's classes ---------------------------------------------------------------


def _torchvision(title: str, data_dir: Path, make: Callable[..., object], **kwargs: object) -> object:
    """A torchvision dataset object, with its complaints turned into one-line messages."""
    try:
        return make(str(data_dir), **kwargs)
    except Exception as exc:  # noqa: BLE001 - parsing files from outside fails in many ways, all the file's fault
        if kwargs.get("download"):
            raise _download_failed(title, data_dir, exc) from None
        what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {title} in {data_dir} ({what}); the files are incomplete or corrupted: "
                        "delete them and rerun with `download`") from None


def _mnist_like(kind: str) -> tuple[Callable[[Path], None], Callable[[Path], Arrays]]:
    def cls():
        from torchvision import datasets  # the dataset classes load a second of imports

        return getattr(datasets, kind)

    def fetch(data_dir: Path) -> None:
        for train in (True, False):
            _torchvision(kind, data_dir, cls(), train=train, download=True)

    def read(data_dir: Path) -> Arrays:
        parts = []
        for train in (True, False):
            ds = _torchvision(kind, data_dir, cls(), train=train)
            parts.append((ds.data.numpy()[:, None], ds.targets.numpy().astype(np.int64)))
        return Arrays(list(cls().classes), parts[0], parts[1])

    return fetch, read


def _svhn_cls():
    try:
        import scipy.io  # noqa: F401 - torchvision's SVHN reads MATLAB files with it
    except ImportError:
        raise UserError("`dataset` svhn needs scipy: pip install scipy") from None
    from torchvision.datasets import SVHN

    return SVHN


def _fetch_svhn(data_dir: Path) -> None:
    for split in ("train", "test"):
        _torchvision("SVHN", data_dir / SVHN_FOLDER, _svhn_cls(), split=split, download=True)


def _read_svhn(data_dir: Path) -> Arrays:
    parts = []
    for split in ("train", "test"):
        ds = _torchvision("SVHN", data_dir / SVHN_FOLDER, _svhn_cls(), split=split)
        parts.append((np.ascontiguousarray(ds.data), np.asarray(ds.labels, dtype=np.int64)))
    return Arrays([str(d) for d in range(10)], parts[0], parts[1])  # torchvision maps the label 10 to 0


def _stl10_cls():
    from torchvision.datasets import STL10

    return STL10


def _fetch_stl10(data_dir: Path) -> None:
    _torchvision("STL-10", data_dir, _stl10_cls(), split="test", download=True)


def _read_stl10(data_dir: Path) -> Arrays:
    parts, classes = [], []
    for split in ("train", "test"):
        ds = _torchvision("STL-10", data_dir, _stl10_cls(), split=split)
        parts.append((np.ascontiguousarray(ds.data), np.asarray(ds.labels, dtype=np.int64)))
        classes = list(getattr(ds, "classes", []))
    if len(classes) != 10:
        raise UserError(f"{data_dir / STL10_FOLDER / 'class_names.txt'} does not name the 10 classes; "
                        "delete the folder and rerun with `download`")
    return Arrays(classes, parts[0], parts[1])


_mnist_fetch, _mnist_read = _mnist_like("MNIST")
_fashion_fetch, _fashion_read = _mnist_like("FashionMNIST")

NAMED: dict[str, Named] = {
    "cifar10": Named("cifar10", "CIFAR-10", _cifar10_folder, (*CIFAR10_TRAIN_BATCHES, "test_batch", "batches.meta"),
                     lambda d: _download_archive(CIFAR10_URL, CIFAR10_MD5, d, "CIFAR-10"), _read_cifar10),
    "cifar100": Named("cifar100", "CIFAR-100", lambda d: d / CIFAR100_FOLDER, ("train", "test", "meta"),
                      _fetch_cifar100, _read_cifar100),
    "mnist": Named("mnist", "MNIST", lambda d: d / "MNIST" / "raw", MNIST_FILES, _mnist_fetch, _mnist_read),
    "fashion-mnist": Named("fashion-mnist", "Fashion-MNIST", lambda d: d / "FashionMNIST" / "raw", MNIST_FILES,
                           _fashion_fetch, _fashion_read),
    "svhn": Named("svhn", "SVHN", lambda d: d / SVHN_FOLDER, SVHN_FILES, _fetch_svhn, _read_svhn),
    "stl10": Named("stl10", "STL-10", lambda d: d / STL10_FOLDER, STL10_FILES, _fetch_stl10, _read_stl10),
}


def checked(arrays: Arrays, title: str, where: Path) -> Arrays:
    """``arrays`` after checking what the trainer relies on: uint8 (N, C, H, W), labels within the classes."""
    for split, (x, y) in (("training", arrays.train), ("test", arrays.test)):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) != len(y) or not len(x):
            raise UserError(f"{title} {split} images in {where} are not what the format promises "
                            f"({x.dtype} {x.shape}, {len(y)} labels); delete them and rerun with `download`")
        if y.min() < 0 or y.max() >= len(arrays.classes):
            raise UserError(f"{title} {split} labels in {where} exceed the {len(arrays.classes)} classes; "
                            "delete them and rerun with `download`")
    return arrays
