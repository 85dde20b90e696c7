"""``cnnlab demo``: the whole path on a laptop CPU in about a minute, offline.

A width-16 ResNet-18 (CIFAR stem, 32 px) trains on the CIFAR-10 sample bundled with the package,
then is evaluated; the run folder it leaves is the same kind that a full run writes.
"""

from __future__ import annotations

from pathlib import Path

from cnnlab.config import resolve
from cnnlab.evaluate import evaluate
from cnnlab.run import new_run_dir
from cnnlab.train.engine import train

DEMO = dict(recipe="fast", dataset="sample", model="resnet18-cifar", width=16, image_size=32,
            epochs=10, batch_size=128, lr=0.2, device="cpu")


def demo(out: str | Path | None = None) -> Path:
    """Train and evaluate the demo model; returns the run folder."""
    out = Path(out) if out else new_run_dir("demo")
    cfg = resolve(overrides={**DEMO, "out": str(out)})
    print(f"cnnlab demo: training {cfg.model} (width {cfg.width}, {cfg.image_size} px) on the bundled "
          f"CIFAR-10 sample for {cfg.epochs} epochs on the CPU …", flush=True)
    result = train(cfg)
    scores = evaluate(result.run_dir)
    last = result.last
    print(f"\ntrain accuracy {100 * last['train_acc']:.1f}%, validation {100 * last['val_acc']:.1f}%, "
          f"test {100 * scores['top1']:.1f}% on {scores['n']} images (chance: 10%)")
    print(f"run folder:        {result.run_dir}")
    print(f"  checkpoints:     {result.run_dir / 'checkpoints'}")
    print(f"  metrics:         {result.run_dir / 'metrics.jsonl'}")
    print(f"  evaluation:      {', '.join(scores['outputs'])}")
    print(f"  TensorBoard:     tensorboard --logdir {result.run_dir / 'tb'}   (then open http://localhost:6006)")
    return result.run_dir
