"""What every benchmark row records besides its speed, and how a run of rows is printed and saved.

Peak memory comes from ``resource.getrusage``: ``ru_maxrss`` of this process and of its waited-for
children (DataLoader workers, training subprocesses). It is a lifetime high-water mark, so a row is
only attributable when it runs in a fresh process; the benchmarks do that.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cnnlab.train.device import cpu_info

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).parent / "results"
TARGETS = (0.88, 0.94)  # test accuracies timed to: the assignment's and airbench94's


def peak_host_rss_mb() -> dict[str, float]:
    """Peak resident memory in MiB of this process and of its largest finished child (Linux: KiB units)."""
    def mib(who: int) -> float:
        return round(resource.getrusage(who).ru_maxrss / 1024, 1)

    return {"host_rss_peak_mb": mib(resource.RUSAGE_SELF), "children_rss_peak_mb": mib(resource.RUSAGE_CHILDREN)}


# The instruction sets that change a CPU figure most: the vector width, and native bf16 (what --amp uses).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine_info() -> dict[str, Any]:
    """The facts a reader needs to compare a result file with their own machine."""
    model, flags = cpu_info()
    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "cpu": model,
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels torch chose (ATEN_CPU_CAPABILITY)
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A fixed-width text table; ``columns`` are (key, header) pairs, missing values print as '-'."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.1f}"
        return str(value)

    body = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max(len(r[i]) for r in [headers, *body]) for i in range(len(columns))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in body]
    return "\n".join(lines)


def write_json(document: dict[str, Any], name: str, directory: Path | None = None) -> Path:
    """Write ``document`` to ``directory/name`` (default benchmarks/results/) and return the path."""
    directory = RESULTS_DIR if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def shown_path(path: str | Path) -> str:
    """A path as a result file names it: relative to the repository when inside it, else by its last part
    alone, so that no record carries the folders of the machine that wrote it."""
    path = Path(path).absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def command_line() -> str:
    """The command that is running, its paths written as :func:`shown_path` writes them."""
    return " ".join([Path(sys.executable).name, *(shown_path(a) if os.path.isabs(a) else a for a in sys.argv)])
