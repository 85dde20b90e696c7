"""The heavy results of the explorer: computed once, by one background worker, and cached on disk.

Top images of a channel (a pass over the whole test set), its activation maximisation, the test
set's scores and the explanations' trust scores take seconds to minutes. A request for one never
waits for it: it gets the job's state (queued, how many jobs ahead, the fraction done) and asks
again; the page polls. One thread runs the jobs one at a time, so the interactive requests keep
the other cores. Each result is written as JSON next to the run (``RUN_DIR/explore/…``) with
:func:`cnnlab.core.files.atomic_write`, stamped with the checkpoint it was computed from, so a
second request, or a later ``cnnlab serve`` of the same run, reads it instead of computing it; a
retrained run (another checkpoint) computes it afresh.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write

__all__ = ["Job", "Jobs", "Status"]

log = logging.getLogger(__name__)

Progress = Callable[[float], None]
KEPT = 256  # finished results held in memory; older ones are read back from disk when asked for again


@dataclass
class Job:
    """What to compute and where its result lives."""

    key: str  # unique: run, kind and parameters
    path: Path  # the cache file (JSON)
    stamp: dict[str, Any]  # what the result depends on (checkpoint, parameters); a cached file must match
    compute: Callable[[Progress], dict[str, Any]]  # runs in the worker; reports the fraction done


@dataclass
class Status:
    state: str  # queued, running, done or failed
    progress: float = 0.0
    ahead: int = 0  # jobs queued before this one
    result: dict[str, Any] | None = field(default=None, repr=False)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "progress": round(self.progress, 3), "ahead": self.ahead}
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out


class Jobs:
    """The worker and its caches. :meth:`request` answers at once, from memory, disk or the queue."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._pending: list[str] = []  # keys in queue order, the running one first
        self._status: dict[str, Status] = {}  # queued, running and failed jobs
        self._done: OrderedDict[str, dict[str, Any]] = OrderedDict()  # finished results, least recent first
        self.computed: Counter[str] = Counter()  # how often each key was computed (cached reads not counted)
        self._thread = threading.Thread(target=self._work, name="cnnlab-serve-jobs", daemon=True)
        self._thread.start()

    def request(self, job: Job) -> Status:
        """The job's result when it is known, else its state; queues it when it is neither."""
        with self._lock:
            if job.key in self._done:
                self._done.move_to_end(job.key)
                return Status("done", 1.0, result=self._done[job.key])
            status = self._status.get(job.key)
            if status is not None and status.state != "failed":
                status.ahead = self._pending.index(job.key) if job.key in self._pending else 0
                return status
        cached = _read(job)  # a small JSON file: read outside the lock
        with self._lock:
            if cached is not None:
                self._keep(job.key, cached)
                return Status("done", 1.0, result=cached)
            if status is not None and status.state == "failed" and job.key in self._status:
                return status  # not retried within a session: the same inputs would fail again
            if job.key not in self._status:
                self._status[job.key] = Status("queued")
                self._pending.append(job.key)
                self._queue.put(job)
            status = self._status[job.key]
            status.ahead = self._pending.index(job.key)
            return status

    def _keep(self, key: str, result: dict[str, Any]) -> None:
        self._done[key] = result
        self._done.move_to_end(key)
        while len(self._done) > KEPT:
            self._done.popitem(last=False)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            status = self._status[job.key]
            status.state = "running"

            def progress(fraction: float, status: Status = status) -> None:
                status.progress = max(0.0, min(1.0, float(fraction)))

            try:
                result = job.compute(progress)
                self.computed[job.key] += 1
            except UserError as e:
                self._fail(job, str(e))
                continue
            except Exception as e:  # a bug or a machine problem must not stop the worker for the other jobs
                log.exception("job %s failed", job.key)
                self._fail(job, f"{type(e).__name__}: {e}")
                continue
            try:
                atomic_write(job.path, json.dumps({"stamp": job.stamp, "result": result}))
            except OSError as e:  # a read-only run folder: the result still serves this session
                log.warning("could not cache %s: %s", job.path, e)
            with self._lock:
                self._keep(job.key, result)
                self._status.pop(job.key, None)
                self._pending.remove(job.key)

    def _fail(self, job: Job, message: str) -> None:
        with self._lock:
            status = self._status[job.key]
            status.state, status.error = "failed", message
            self._pending.remove(job.key)


def _read(job: Job) -> dict[str, Any] | None:
    """The cached result, if the file is there, whole, and computed from the same inputs."""
    try:
        saved = json.loads(job.path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("stamp") != job.stamp or not isinstance(saved.get("result"), dict):
        return None
    return saved["result"]
