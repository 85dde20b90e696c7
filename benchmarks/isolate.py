"""Running one benchmark row in a fresh Python process and getting its result back as JSON.

A fresh process per row means its peak memory (``ru_maxrss``) is its own, a crash or an
out-of-memory in one row does not end the others, and no compile cache or allocator state leaks
from one row into the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import report

REPO = Path(__file__).resolve().parent.parent
MARK = "BENCHMARK-ROW "  # prefixes the one stdout line of a row process that carries its result


def python_path() -> str:
    """src/ (cnnlab need not be installed) and the repository root (the benchmarks package)."""
    return os.pathsep.join(p for p in (str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def run(module: str, job: dict[str, Any], timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m module --row JOB`` and return its result; failures become ``{"error": …}``."""
    environment = {**os.environ, **(env or {}), "PYTHONPATH": python_path()}
    try:
        done = subprocess.run([sys.executable, "-m", module, "--row", json.dumps(job)], cwd=REPO,
                              env=environment, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit status {done.returncode}: {tail}"}


def child_main(job: str, rows: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """The other end of :func:`run`: do the row named by ``job["section"]`` and print its result."""
    spec = json.loads(job)
    try:
        result = rows[spec["section"]](spec)
    except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing on this machine is a result too
        lines = str(e).strip().splitlines()
        result = {"error": f"{type(e).__name__}: {lines[0] if lines else ''}"}
    result.update(report.peak_host_rss_mb())
    print(MARK + json.dumps(result), flush=True)
