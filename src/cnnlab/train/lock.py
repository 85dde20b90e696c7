"""One training process per run folder.

Two processes writing the same checkpoints and logs would interleave them into nonsense, so a
run holds an exclusive lock on ``RUN_DIR/.lock`` while it trains. The operating system drops the
lock when the process dies, however it dies, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cnnlab.core.errors import UserError


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``RUN_DIR/.lock``; use it as a context manager."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path.parent} is being trained by process {holder} right now; wait for it "
                            "to finish (or stop it) before training into this folder again") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
