"""``cnnlab serve``: explore trained runs in the browser, on this machine, offline.

Starlette routes (:mod:`cnnlab.serve.app`) render one page per run (:mod:`cnnlab.serve.pages`) and
answer its script's requests with JSON, behind the checks of :mod:`cnnlab.serve.middleware` (only the
server's own host names, POSTs only from its own page); uvicorn serves them. The runs are loaded once
(:mod:`cnnlab.serve.runs`), uploads are held in memory (:mod:`cnnlab.serve.store`) and heavy
results are computed by one background worker and cached next to each run
(:mod:`cnnlab.serve.jobs`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cnnlab.core.errors import UserError
from cnnlab.report.sections import SMALL_MODEL_MACS

if TYPE_CHECKING:
    from cnnlab.serve.jobs import Jobs

__all__ = ["bind", "load_runs", "serve"]

log = logging.getLogger(__name__)


def load_runs(run_dirs: Sequence[str | Path], jobs: Jobs | None = None):
    """The run folders loaded for serving, each checked (``UserError`` naming the one that is not a run);
    their heavy results are computed by ``jobs`` (default: a new worker with the default bounds)."""
    from cnnlab.serve.jobs import Jobs
    from cnnlab.serve.runs import open_run
    from cnnlab.serve.store import ImageStore

    if not run_dirs:
        raise UserError("give at least one run folder")
    jobs, images, taken = Jobs() if jobs is None else jobs, ImageStore(), set()
    return [open_run(i, path, jobs, images, taken) for i, path in enumerate(run_dirs)]


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: a free port), or a ``UserError`` saying why not."""
    if not 0 <= port <= 65535:
        raise UserError(f"`port` must be between 0 and 65535 (got {port})")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"cannot listen on host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use; choose another `port` "
                            "(0 picks a free one)") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(run_dirs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8000,
          ready: Callable[[str], None] = print, allow_hosts: Sequence[str] = ()) -> None:
    """Serve the runs until interrupted; ``ready`` is given the URL once the server listens. Requests
    must name the server (their Host header) by a loopback name, ``host`` or one of ``allow_hosts``."""
    import uvicorn

    from cnnlab.serve.app import create_app
    from cnnlab.serve.middleware import allowed_hosts

    if not 0 <= port <= 65535:  # said before the runs are loaded
        raise UserError(f"`port` must be between 0 and 65535 (got {port})")
    hosts = allowed_hosts(host, allow_hosts)
    runs = load_runs(run_dirs)
    sock = bind(host, port)
    if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
        log.warning("listening on %s: anyone who can reach this machine can use the explorer, upload images and "
                    "see the runs' test images (the default, 127.0.0.1, is this machine only); it answers to the "
                    "names %s (`allow_hosts` adds one)", host, ", ".join(hosts))
    # Small models: each request on one thread. Their tensors are too small to split, and twenty
    # concurrent requests each spinning up every core's thread would only wait on each other.
    if all(r.summary["macs"] < SMALL_MODEL_MACS for r in runs):
        torch.set_num_threads(1)
    app = create_app(runs, hosts=hosts, port=sock.getsockname()[1])
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    ready(url_of(sock))
    server.run(sockets=[sock])
