"""``cnnlab demo``: the whole path on a laptop CPU in a few minutes, offline.

A width-16 ResNet-18 (CIFAR stem, 32 px) trains on the CIFAR-10 sample bundled with the package,
then is evaluated, a small gallery of what it learned is drawn (``cnnlab visualize``) and the HTML
report is written (``cnnlab report``); the run folder it leaves is the same kind that a full run writes.
It ends by printing the ``cnnlab serve`` command that explores the run in the browser.
"""

from __future__ import annotations

from pathlib import Path

from cnnlab.config import resolve
from cnnlab.evaluate import evaluate
from cnnlab.report import report
from cnnlab.train.engine import new_run_dir, train
from cnnlab.visualize import visualize

# Test images for the gallery: the sample's test set is ordered by class, 100 images each, so these
# are an airplane, a cat, a dog and a ship.
GALLERY_IMAGES = [0, 300, 500, 800]

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
          f"test {100 * scores['top1']:.1f}% on {scores['n']} images{' with flip TTA' if scores['tta'] else ''} "
          "(chance: 10%)")
    print(f"run folder:        {result.run_dir}")
    print(f"  checkpoints:     {result.run_dir / 'checkpoints'}")
    print(f"  metrics:         {result.run_dir / 'metrics.jsonl'}")
    print(f"  evaluation:      {', '.join(scores['outputs'])}")
    print(f"  TensorBoard:     tensorboard --logdir {result.run_dir / 'tb'}   (then open http://localhost:6006)")
    pngs = gallery(result.run_dir)
    print(f"  inside the net:  {result.run_dir / 'viz'}  ({len(pngs)} figures: conv1 filters, feature maps at conv1 "
          "and conv5_x, Grad-CAM; more with: cnnlab visualize METHOD RUN_DIR)")
    page = report(result.run_dir, device="cpu")
    print(f"  report:          {page}  (one HTML page with all of the above; open it in a browser)")
    print(f"\nexplore it in the browser (predict your own images, CAMs, feature maps, channels):\n"
          f"  cnnlab serve {result.run_dir}")
    return result.run_dir


def gallery(run_dir: Path) -> list[Path]:
    """A few figures of the trained model: its conv1 filters, all channels of conv1 and conv5_x for one
    test image, and Grad-CAM and Grad-CAM++ for four (they land in ``run_dir/viz/<method>/``)."""
    pngs = visualize("filters", run_dir, layer="conv1", device="cpu")
    pngs += visualize("features", run_dir, index=GALLERY_IMAGES[1], layer=["conv1", "conv5_x"], device="cpu")
    pngs += visualize("cam", run_dir, index=GALLERY_IMAGES, kind=["grad-cam", "grad-cam++"], device="cpu")
    return pngs
