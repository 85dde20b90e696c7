"""On the real CIFAR-10 (JPEG copy): a small CPU run learns far above chance."""

from cnnlab.config import resolve
from cnnlab.evaluate import evaluate
from cnnlab.train.engine import train


def test_small_cpu_run_learns(cifar10_jpeg, tmp_path):
    cfg = resolve(overrides=dict(
        recipe="fast", dataset=f"folder:{cifar10_jpeg}", model="resnet18-cifar", width=16, image_size=32,
        epochs=3, batch_size=64, lr=0.2, limit_train=5000, limit_test=2000, val_split=0, device="cpu",
        out=str(tmp_path / "run"),
    ))
    result = train(cfg)
    assert result.last["test_acc"] >= 0.35, result.last
    # evaluate scores the same 2,000 test images the run reported on.
    scores = evaluate(result.run_dir)
    assert scores["n"] == 2000
    assert abs(scores["top1"] - result.last["test_acc"]) < 1e-9
