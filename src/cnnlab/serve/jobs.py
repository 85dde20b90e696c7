"""The heavy results of the explorer: computed once, by one background worker, and cached on disk.

Top images of a channel (a pass over the whole test set), its activation maximisation, the test
set's scores and the explanations' trust scores take seconds to minutes. A request for one never
waits for it: it gets the task's state (queued, how many tasks ahead, the fraction done) and asks
again; the page polls. One thread runs the tasks one at a time, so the interactive requests keep
the other cores. Each result is written as JSON next to the run (``RUN_DIR/explore/…``) with
:func:`cnnlab.core.files.atomic_write`, stamped with the checkpoint it was computed from, so a
second request, or a later ``cnnlab serve`` of the same run, reads it instead of computing it; a
retrained run (another checkpoint) computes it afresh.

The queue holds one task per key and at most :data:`QUEUED` of them; a request for another while it
is full gets :class:`Busy` (the app answers 429). A task is worth computing only while some page
waits for it, which it shows by asking again: one that nobody asked about for :data:`IDLE` seconds is
dropped before it starts, or, when running, cancelled at its next progress call. So a client that
asks for many results and goes away leaves the worker idle within seconds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write

__all__ = ["Busy", "IDLE", "Jobs", "QUEUED", "Status", "Task"]

log = logging.getLogger(__name__)

Progress = Callable[[float], None]
KEPT = 256  # finished results held in memory; older ones are read back from disk when asked for again
QUEUED = 16  # tasks waiting at most (the running one not counted); a page asks for six at most at a time
# Seconds without a request after which a task is given up. The page asks every half second, and a
# browser slows a hidden tab's timers to one a second, so this is many missed polls, not a slow client.
IDLE = 15.0


class Busy(Exception):
    """The queue is full; the request may be made again once some task has finished."""


class _Cancelled(Exception):
    """Raised in the worker, from a running task's progress call, once nobody waits for the task."""


@dataclass
class Task:
    """What to compute and where its result lives."""

    key: str  # unique: run, kind and parameters
    path: Path  # the cache file (JSON)
    stamp: dict[str, Any]  # what the result depends on (checkpoint, parameters); a cached file must match
    compute: Callable[[Progress], dict[str, Any]]  # runs in the worker; reports the fraction done


@dataclass
class Status:
    state: str  # queued, running, done or failed
    progress: float = 0.0
    ahead: int = 0  # tasks queued or running before this one
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
    """The worker, its bounded queue and the caches. :meth:`request` answers at once, from memory, disk or
    the queue. ``limit`` tasks wait at most; one not asked about for ``idle`` seconds is given up."""

    def __init__(self, limit: int = QUEUED, idle: float = IDLE) -> None:
        self.limit, self.idle = limit, idle
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: OrderedDict[str, Task] = OrderedDict()  # waiting tasks, first to run first
        self._running: str | None = None
        self._status: dict[str, Status] = {}  # queued, running and failed tasks
        self._asked: dict[str, float] = {}  # queued or running task → when it was last asked for (monotonic)
        self._done: OrderedDict[str, dict[str, Any]] = OrderedDict()  # finished results, least recent first
        self.computed: Counter[str] = Counter()  # how often each key was computed (cached reads not counted)
        self.dropped: Counter[str] = Counter()  # how often each key was given up unasked, queued or running
        self._thread = threading.Thread(target=self._work, name="cnnlab-serve-jobs", daemon=True)
        self._thread.start()

    def request(self, task: Task) -> Status:
        """The task's result when it is known, else its state; queues it when it is neither (:class:`Busy`
        when the queue is full)."""
        with self._lock:
            if task.key in self._done:
                self._done.move_to_end(task.key)
                return Status("done", 1.0, result=self._done[task.key])
            status = self._status.get(task.key)
            if status is not None and status.state != "failed":
                return self._asked_for(task.key)
        cached = _read(task)  # a small JSON file: read outside the lock
        with self._lock:
            if cached is not None:
                self._keep(task.key, cached)
                return Status("done", 1.0, result=cached)
            status = self._status.get(task.key)
            if status is not None and status.state == "failed":
                return status  # not retried within a session: the same inputs would fail again
            if status is None:
                self._forget_unasked()
                if len(self._queue) >= self.limit:
                    raise Busy(f"the server has {len(self._queue)} results to compute before this one; "
                               "ask again when one of them is done")
                self._status[task.key] = Status("queued")
                self._queue[task.key] = task
                self._wake.notify()
            return self._asked_for(task.key)

    def pending(self) -> list[str]:
        """The keys of the running task (first) and the queued ones, in order."""
        with self._lock:
            return ([self._running] if self._running else []) + list(self._queue)

    def _asked_for(self, key: str) -> Status:
        """Notes that ``key`` (queued or running) is still wanted; its status with the tasks ahead of it."""
        self._asked[key] = time.monotonic()
        status = self._status[key]
        keys = list(self._queue)
        status.ahead = (self._running is not None) + keys.index(key) if key in self._queue else 0
        return status

    def _unasked(self, key: str) -> bool:
        return time.monotonic() - self._asked.get(key, 0.0) > self.idle

    def _forget_unasked(self) -> None:
        for key in [k for k in self._queue if self._unasked(k)]:
            del self._queue[key]
            self._give_up(key)

    def _give_up(self, key: str) -> None:
        self._status.pop(key, None)
        self._asked.pop(key, None)
        self.dropped[key] += 1
        log.info("gave up %s: nobody asked for it in %g s", key, self.idle)

    def _keep(self, key: str, result: dict[str, Any]) -> None:
        self._done[key] = result
        self._done.move_to_end(key)
        while len(self._done) > KEPT:
            self._done.popitem(last=False)

    def _next(self) -> Task:
        """The next task still asked for (waits for one), marked running; the others are given up."""
        with self._wake:
            while True:
                while not self._queue:
                    self._wake.wait()
                key, task = self._queue.popitem(last=False)
                if self._unasked(key):
                    self._give_up(key)
                    continue
                self._running = key
                self._status[key].state = "running"
                return task

    def _progress(self, key: str) -> Progress:
        status = self._status[key]

        def progress(fraction: float) -> None:
            with self._lock:
                if self._unasked(key):
                    raise _Cancelled(key)
            status.progress = max(0.0, min(1.0, float(fraction)))

        return progress

    def _work(self) -> None:
        while True:
            task = self._next()
            try:
                result = task.compute(self._progress(task.key))
                self.computed[task.key] += 1
            except _Cancelled:
                self._finish(task.key)
                continue
            except UserError as e:
                self._finish(task.key, error=str(e))
                continue
            except Exception as e:  # a bug or a machine problem must not stop the worker for the other tasks
                log.exception("task %s failed", task.key)
                self._finish(task.key, error=f"{type(e).__name__}: {e}")
                continue
            try:
                atomic_write(task.path, json.dumps({"stamp": task.stamp, "result": result}))
            except OSError as e:  # a read-only run folder: the result still serves this session
                log.warning("could not cache %s: %s", task.path, e)
            self._finish(task.key, result=result)

    def _finish(self, key: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        """The running task is done (``result``), failed (``error``) or, with neither, cancelled."""
        with self._lock:
            self._running = None
            if result is not None:
                self._keep(key, result)
                self._status.pop(key, None)
                self._asked.pop(key, None)
            elif error is not None:
                status = self._status[key]
                status.state, status.error = "failed", error
                self._asked.pop(key, None)
            else:
                self._give_up(key)


def _read(task: Task) -> dict[str, Any] | None:
    """The cached result, if the file is there, whole, and computed from the same inputs."""
    try:
        saved = json.loads(task.path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("stamp") != task.stamp or not isinstance(saved.get("result"), dict):
        return None
    return saved["result"]
