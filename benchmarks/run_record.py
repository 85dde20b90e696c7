"""A finished run's headline figures as one JSON file: its per-epoch curve, training time, and the
final weights' test accuracy with and without the run's TTA (flip, or airbench's six views), and with
the six views for a run that uses flips or none.

    python -m benchmarks.run_record RUN_DIR NAME.json [--device cpu]

For long runs trained outside a benchmark script (the `fast` recipe at CPU scale, a GPU run made by
hand): the curve is read from ``metrics.jsonl`` (the last record of each epoch wins, so a run resumed
after a crash counts each epoch once), the scores come from ``cnnlab evaluate`` on
``checkpoints/last.pt``. Prints the curve as a table and writes ``benchmarks/results/NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks import report

VIEWS = {False: "one", True: "flip (2 views)", "translate": "flip and 1-pixel shifts (6 views)"}


def final_scores(run_dir: Path, device: str = "auto") -> dict[str, dict[str, float]]:
    """The test scores of a run's final weights with the TTA it was trained to use ("tta": flip, or airbench's
    six views, named under "views"; flip for a run that uses none), without ("plain"), and, for a run that
    does not use them, with the six views ("six"), so that every record can be set beside airbench's. Each
    ``cnnlab evaluate`` output goes to RUN_DIR/eval-NAME."""
    from cnnlab.evaluate import evaluate

    own = json.loads((run_dir / "config.json").read_text())["config"].get("tta") or True
    settings = [("tta", own), ("plain", False)] + ([("six", "translate")] if own != "translate" else [])
    scores = {}
    for name, tta in settings:
        start = time.perf_counter()
        result = evaluate(run_dir / "checkpoints" / "last.pt", device=device, tta=tta, out=run_dir / f"eval-{name}")
        scores[name] = {"top1": result["top1"], "loss": result["loss"], "views": VIEWS[tta],
                        "seconds": round(time.perf_counter() - start, 1)}
    return scores


def time_to(curve: list[dict[str, Any]], targets: tuple[float, ...] = report.TARGETS) -> dict[str, float | None]:
    """For each target test accuracy, the training seconds (steps only, no scoring) up to the end of the first
    epoch whose test accuracy reached it; None where none did."""
    reached: dict[str, float | None] = {}
    for target in targets:
        total, reached[f"{target:.2f}"] = 0.0, None
        for row in curve:
            total += row["seconds"] or 0.0
            if (row["test_acc"] or 0.0) >= target:
                reached[f"{target:.2f}"] = round(total, 1)
                break
    return reached


def record(run_dir: Path, device: str = "auto") -> dict[str, Any]:
    from cnnlab.report.sections import read_metrics

    _, epochs, _ = read_metrics(run_dir)
    info = json.loads((run_dir / "config.json").read_text())
    scores = final_scores(run_dir, device)
    curve = [{key: row.get(key) for key in ("epoch", "lr", "train_loss", "train_acc", "val_acc", "test_acc",
                                            "seconds", "images_per_s")} for row in epochs]
    return {
        "machine": report.machine_info(),
        "command": report.command_line(),
        "run_dir": report.shown_path(run_dir),
        "config": {**info["config"], "out": report.shown_path(info["config"]["out"])},
        "amp": info.get("amp"),
        "data": {key: info.get("data", {}).get(key) for key in ("hash", "train", "val", "test")},
        "epochs_done": len(curve),
        "train_seconds": round(sum(row["seconds"] or 0.0 for row in curve), 1),
        "train_seconds_to": time_to(curve),
        "test_acc_tta": scores["tta"]["top1"],
        "test_acc_plain": scores["plain"]["top1"],
        "scores": scores,
        "curve": curve,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name", help="file name under benchmarks/results/")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="folder for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    document = record(args.run_dir, args.device)
    print(report.format_table(document["curve"], [
        ("epoch", "epoch"), ("lr", "lr at end"), ("train_loss", "train loss"), ("train_acc", "train acc"),
        ("val_acc", "val acc"), ("test_acc", "test acc"), ("seconds", "epoch s"), ("images_per_s", "img/s")]))
    six = document["scores"].get("six")
    print(f"test accuracy of the final weights: {document['test_acc_tta']:.4f} with TTA of "
          f"{document['scores']['tta']['views']}, " + (f"{six['top1']:.4f} with six views, " if six else "") +
          f"{document['test_acc_plain']:.4f} without; {document['train_seconds']:.0f} s of training epochs")
    print("training seconds to " + ", ".join(f"{100 * float(t):.0f}%: {s if s is not None else 'not reached'}"
                                             for t, s in document["train_seconds_to"].items()))
    print(f"wrote {report.write_json(document, args.name, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
