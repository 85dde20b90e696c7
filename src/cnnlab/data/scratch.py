"""A private scratch folder beside the pixel cache, for an archive's members while its entry is built.

The folder is made in the cache's folder (``CNNLAB_CACHE``, :func:`~cnnlab.data.store.entries_dir`)
rather than the system's temporary folder: the cache lives on a disk chosen to hold decoded datasets
(a full one is reported with "set CNNLAB_CACHE to another disk"), and the entry being built goes to
the same disk, whereas ``/tmp`` is often a RAM-backed tmpfs (Fedora, Arch, Debian 13) on which the
unpacked members would take memory again, or a small partition. It is private (mode 0700, from
:func:`tempfile.mkdtemp`) and removed when the ``with`` block ends, on an error or Ctrl-C as well. A
folder left behind by a process that was killed outright (SIGKILL, the OOM killer, a power cut) is
removed by the next one: each live folder holds a lock that dies with its process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cnnlab.core.errors import UserError
from cnnlab.data.store import entries_dir

PREFIX = ".unpacked-"
LOCK = ".lock"

try:
    import fcntl
except ImportError:  # Windows: no lock, and no sweep of folders left behind
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """A new private folder in the cache's folder, removed with everything in it when the block ends."""
    root = entries_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        _sweep(root)
        folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
    except OSError as e:
        raise UserError(f"cannot create a folder to unpack the archive into in the dataset cache {root}: "
                        f"{e.strerror}; set CNNLAB_CACHE to a writable folder") from None
    try:
        with _held(folder):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _held(folder: Path) -> Iterator[None]:
    """Lock ``folder`` for as long as the block runs (and the process lives).

    The lock file is locked under another name and then renamed into place, so that :func:`_sweep`
    never finds a ``.lock`` that is not locked yet."""
    if fcntl is None:
        yield
        return
    with open(folder / f"{LOCK}.new", "wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        os.rename(folder / f"{LOCK}.new", folder / LOCK)
        yield


def _sweep(root: Path) -> None:
    """Remove the scratch folders in ``root`` whose process has died (their lock can be taken)."""
    if fcntl is None:
        return
    for folder in root.glob(f"{PREFIX}*"):
        try:
            fd = os.open(folder / LOCK, os.O_RDONLY)
        except OSError:  # being made (not locked yet), or being removed
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its process is unpacking into it
            continue
        else:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
