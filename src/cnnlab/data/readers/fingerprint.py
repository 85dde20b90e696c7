"""Content hashes: a source's fingerprint (which a run records, and ``--resume`` checks) and its cache key.

Every hash here is part of a stored promise: a change to what goes into one changes the
fingerprint of data that did not change (and ``--resume`` would refuse it) or misses the cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.core.errors import UserError
from cnnlab.data.readers.files import open_regular
from cnnlab.data.readers.tree import Tree
from cnnlab.data.standard import Arrays

# Part of every cache key: bump it whenever decoding would give different pixels or labels.
DECODER_VERSION = 3  # 3: stored at the run's size, resized by torch's antialiased kernel


def cache_key(content: str) -> str:
    """Decoded pixels depend on the content and on the decoder: both are in the cache key (the
    content hash alone is the data's fingerprint, which a new decoder does not change)."""
    return hashlib.sha256(f"cnnlab-decoder-{DECODER_VERSION}\0{content}".encode()).hexdigest()


def _update(digest: Any, path: Path, sized: bool) -> None:
    """Feed ``path``'s bytes to ``digest``, after its size when ``sized``; only a regular file is read."""
    try:
        with open_regular(path) as f:
            if sized:
                digest.update(f"{os.fstat(f.fileno()).st_size}\0".encode())
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; check its permissions") from None


def hash_file(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    _update(digest, path, sized=False)
    return digest.hexdigest()


def hash_files(paths: Iterable[Path], salt: str) -> str:
    """sha256 of several files, each with its size, after ``salt`` (what kind of list they are)."""
    digest = hashlib.sha256(f"{salt}\0".encode())
    for path in paths:
        _update(digest, path, sized=True)
    return digest.hexdigest()


def hash_tree(tree: Tree) -> str:
    """Content hash of a directory tree (its layout and image bytes), read one file at a time."""
    digest = hashlib.sha256()
    for d in sorted(tree.dirs):  # empty class folders change the outcome too
        digest.update(f"d\0{d}\0".encode())
    for rel in sorted(tree.files):
        digest.update(f"f\0{rel}\0".encode())
        source = tree.files[rel]
        if isinstance(source, Path):
            _update(digest, source, sized=True)
        else:
            digest.update(f"{len(source)}\0".encode())
            digest.update(source)
    return digest.hexdigest()


def hash_arrays(arrays: Arrays) -> str:
    """sha256 of a named dataset's class names, pixels and labels: its fingerprint, whatever its files."""
    digest = hashlib.sha256("\0".join(arrays.classes).encode())
    for array in (*arrays.train, *arrays.test):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()
