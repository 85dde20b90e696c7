"""``python -m cnnlab train ARGS…``, then the run's peak GPU and host memory written to a JSON file.

    python -m benchmarks.train_run MEMORY.json train --recipe fast …

The training is exactly the command line's (``cnnlab.cli.main``); only the memory report is added,
because a separate process cannot read another's ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from benchmarks import report


def main(argv: list[str]) -> int:
    from cnnlab.cli import main as cnnlab_main

    memory_file, cnnlab_args = Path(argv[0]), argv[1:]
    status = cnnlab_main(cnnlab_args)
    memory = report.peak_host_rss_mb()
    if torch.cuda.is_available():
        memory["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    memory_file.write_text(json.dumps(memory))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
