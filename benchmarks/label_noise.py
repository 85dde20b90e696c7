"""How many planted label errors ``cnnlab labels`` finds: the bundled sample with a share of its training labels
flipped, trained as ``cnnlab demo`` trains, then confident learning on the validation split and by K-fold
cross-validation.

The flipped images are written to a folder dataset (``train/<class>/``, ``test/<class>/`` as PNG, pixel for
pixel), each moved to a class drawn uniformly from the others. A candidate is a planted error when its pixels
are those of a flipped image (found by their hash, so the dataset's own order does not matter).

    python -m benchmarks.label_noise                 # 5% flipped, width 16, 10 epochs, 5 folds
    python -m benchmarks.label_noise --width 8 --epochs 5 --folds 0   # the validation split only

The second took 26 minutes on a 2-core CPU busy with other work (training_s in its record).

Prints the recall and precision of each source and writes ``benchmarks/results/label-noise-YYYYMMDD.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

DEMO = {"recipe": "fast", "dataset": None, "model": "resnet18-cifar", "width": 16, "image_size": 32, "epochs": 10,
        "batch_size": 128, "lr": 0.2}


def digest(image: torch.Tensor) -> str:
    """What names an image by its pixels."""
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


def write_noisy_folder(out: Path, classes: list[str], train: tuple[torch.Tensor, torch.Tensor],
                       test: tuple[torch.Tensor, torch.Tensor], fraction: float, seed: int = 0) -> set[str]:
    """uint8 images (N, C, H, W) and labels written as a folder dataset in ``out``, with ``fraction`` of the
    training labels flipped to another class (uniformly); the digests of the flipped images."""
    g = torch.Generator().manual_seed(seed)
    x, y = train
    flipped = torch.randperm(len(y), generator=g)[:round(fraction * len(y))]
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + torch.randint(1, len(classes), (len(flipped),), generator=g)) % len(classes)
    for split, images, labels in (("train", x, noisy), ("test", *test)):
        for c in classes:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            pixels = image.permute(1, 2, 0).numpy()
            Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(
                out / split / classes[int(label)] / f"{i:06d}.png")
    return {digest(x[i]) for i in flipped.tolist()}


def score_found(loaded: Any, result: dict[str, Any], planted: set[str], examined: torch.Tensor) -> dict[str, Any]:
    """Recall (planted errors among the examined images that were found), precision (found that were planted)
    and the ranks of the planted errors among the candidates."""
    planted_here = sum(digest(image) in planted for image in examined)
    index = torch.tensor([issue["index"] for issue in result["issues"]], dtype=torch.long)
    ranks = ([k + 1 for k, image in enumerate(loaded.training_images(index)[0]) if digest(image) in planted]
             if len(index) else [])
    hits = len(ranks)
    return {"examined": result["examined"], "planted": planted_here, "found": result["found"], "hits": hits,
            "hit_ranks": ranks,  # where the planted errors found stand in the ranking (1: most likely wrong)
            "recall": hits / max(planted_here, 1), "precision": hits / max(result["found"], 1),
            "fold_accuracy": result["fold_accuracy"]}


def main(argv: list[str] | None = None) -> None:
    from cnnlab import run
    from cnnlab.config import resolve
    from cnnlab.data import load_dataset
    from cnnlab.labels import labels
    from cnnlab.train.engine import train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--folds", type=int, default=5, help="0: the validation split only")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--work", default="label-noise", help="folder for the dataset and the run")
    args = p.parse_args(argv)
    work = Path(args.work)
    sample = load_dataset("sample")
    planted = write_noisy_folder(work / "data", sample.classes, (sample.train_x, sample.train_y),
                                 (sample.test_x, sample.test_y), args.fraction)
    settings = {**DEMO, "dataset": f"folder:{work / 'data'}", "width": args.width, "epochs": args.epochs,
                "out": str(work / "run")}
    start = time.perf_counter()
    train(resolve(settings["recipe"], overrides={k: v for k, v in settings.items() if k != "recipe"}))
    rows: dict[str, Any] = {"training_s": time.perf_counter() - start}
    loaded = run.load(work / "run")
    held = loaded.splits()
    for folds in [None] + ([args.folds] if args.folds else []):
        start = time.perf_counter()
        result = labels(work / "run", folds=folds)
        examined = held.val_x.read() if folds is None else held.train_x.read()
        row = {**score_found(loaded, result, planted, examined), "seconds": time.perf_counter() - start}
        rows["validation" if folds is None else f"{folds}-fold"] = row
        print(f"{'validation' if folds is None else f'{folds}-fold'}: {row['hits']} of {row['planted']} planted "
              f"errors found (recall {100 * row['recall']:.0f}%), {row['found']} candidates (precision "
              f"{100 * row['precision']:.0f}%), {row['seconds']:.0f} s", flush=True)
    record = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "fraction": args.fraction, "rows": rows,
              # the scratch folder (--work) is this machine's: the record names it WORK
              "settings": {**settings, "dataset": "folder:WORK/data", "out": "WORK/run"}}
    out = Path("benchmarks/results") / f"label-noise-{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
