"""What a reader may open: regular files, each within the bound on one image's size.

A device or a FIFO among a dataset's files (a link to ``/dev/zero``, a named pipe called
``x.png``, a CSV row naming either) would be hashed forever or block the reader for good; each is
refused by name before anything reads it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from cnnlab.core.errors import UserError


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def not_regular(path: Path, mode: int, name: str | None = None, hint: str = "remove it from the dataset") -> UserError:
    """The error for ``path`` (called ``name`` in the message), which ``mode`` says is no regular file."""
    link = f" (a link to {os.path.realpath(path)})" if path.is_symlink() else ""
    return UserError(f"{name or path}{link} is {_kind(mode)}, not a regular file; {hint}")


def check_image_file(path: Path, limit: int, name: str | None = None) -> None:
    """Refuse ``path`` unless it is a regular file of at most ``limit`` bytes, without opening it.

    ``name`` is what messages call it (the path by default); links are followed."""
    name = name or str(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise UserError(f"cannot read {name}: {exc.strerror}; check that it exists and its permissions") from None
    if not stat.S_ISREG(info.st_mode):
        raise not_regular(path, info.st_mode, name)
    if info.st_size > limit:
        raise UserError(f"{name} is {info.st_size / 2**20:,.0f} MiB, more than any image cnnlab reads "
                        f"({limit / 2**20:,.0f} MiB, see CNNLAB_MAX_IMAGE_BYTES); remove it")


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, refused if it is not a regular file.

    Readers check every name before it gets here (:func:`check_image_file`, or ``is_file``); this
    checks the open file, for one replaced since, and cannot block on a FIFO (``O_NONBLOCK``)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
