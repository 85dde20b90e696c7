"""The process pool that reads headers and decodes images a chunk at a time, for sets big enough to pay for it."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

POOL_MIN_IMAGES = 4000  # below this a process pool costs more than it saves ...
POOL_MIN_BYTES = 256 * 2**20  # ... unless the decoded images are this large
POOL_CHUNK = 1000  # images per chunk at most ...
CHUNK_BYTES = 16 * 2**20  # ... and decoded bytes per chunk at most: what bounds the memory of a build

_T = TypeVar("_T")  # what a chunk function returns


def worker_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def one_torch_thread() -> Iterator[None]:
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
def executor(total: int, total_bytes: int) -> Iterator[tuple[Executor | None, int]]:
    """A process pool, and how many chunks may be in flight, for big sets where fork is available.

    Only from the main thread: a fork from any other thread copies locks that other threads (torch's,
    the server's) may hold at that moment, and the child can hang on them forever. Elsewhere the
    images are decoded in this process."""
    workers = worker_count()
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


def map_chunks(fn: Callable[..., _T], chunks: Iterable[list[Any]], pool: Executor | None, window: int,
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
