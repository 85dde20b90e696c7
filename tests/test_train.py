"""Training end to end on the bundled sample: logs, checkpoints, exact resume, determinism."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnnlab.config import resolve
from cnnlab.core.checkpoint import load as load_checkpoint
from cnnlab.evaluate import evaluate
from cnnlab.train import engine

TINY = dict(recipe="fast", dataset="sample", model="resnet18-cifar", width=8, image_size=32, epochs=2,
            batch_size=64, lr=0.1, limit_train=640, limit_test=200, val_split=64, device="cpu", seed=3)
STEPS_PER_EPOCH = 9  # 576 training images in batches of 64


def tiny(out, **changes):
    return resolve(overrides={**TINY, "out": str(out), **changes})


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return engine.train(tiny(tmp_path_factory.mktemp("runs") / "tiny")).run_dir


def test_metrics_jsonl_has_every_step_and_epoch(tiny_run):
    records = read_metrics(tiny_run)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[-1]["step"] == 2 * STEPS_PER_EPOCH
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "seconds",
                "images_per_s"):
        assert all(key in e for e in epochs), key
    assert all(0 <= e["test_acc"] <= 1 and e["images_per_s"] > 0 for e in epochs)
    # The epoch's train loss is the image-weighted mean of its steps (the last batch is smaller).
    first = steps[:STEPS_PER_EPOCH]
    sizes = [64] * STEPS_PER_EPOCH
    mean = sum(s["loss"] * n for s, n in zip(first, sizes)) / sum(sizes)
    assert epochs[0]["train_loss"] == pytest.approx(mean, rel=1e-6)
    # onecycle: warms up then anneals to (almost) zero.
    lrs = [s["lr"] for s in steps]
    assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[-1] < 0.01 and lrs[0] < lrs[4]


def test_tensorboard_holds_the_curves(tiny_run):
    acc = EventAccumulator(str(tiny_run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "lr", "epoch/train_loss", "epoch/train_acc", "val/loss", "val/acc",
            "test/loss", "test/acc", "perf/images_per_s"} <= tags
    losses = [e.value for e in acc.Scalars("train/loss")]
    expected = [r["loss"] for r in read_metrics(tiny_run) if r["kind"] == "step"]
    assert losses == pytest.approx(expected, rel=1e-6)
    test_acc = [e.value for e in acc.Scalars("test/acc")]
    assert test_acc == pytest.approx([r["test_acc"] for r in read_metrics(tiny_run) if r["kind"] == "epoch"])
    assert "config" in "".join(acc.Tags()["tensors"])
    assert acc.PluginTagToContent("hparams"), "hyper-parameters are not logged"


def test_checkpoints_load_safely_and_best_is_by_validation(tiny_run):
    last = load_checkpoint(tiny_run / "checkpoints" / "last.pt")
    best = load_checkpoint(tiny_run / "checkpoints" / "best.pt")
    assert last["step"] == 2 * STEPS_PER_EPOCH and last["epoch"] == 2
    assert last["schema"] == 2
    assert last["model_spec"] == {"name": "resnet18-cifar", "num_classes": 10, "width": 8, "in_channels": 3}
    assert last["preprocess"]["size"] == 32 and last["preprocess"]["channels"] == 3
    assert last["classes"][0] == "airplane" and len(last["classes"]) == 10
    assert last["preprocess"]["mean"] == pytest.approx(list(TINY.get("mean", resolve("fast").mean)))
    val = [r["val_acc"] for r in read_metrics(tiny_run) if r["kind"] == "epoch"]
    assert best["best_val_acc"] == max(val) and best["epoch"] == 1 + val.index(max(val))
    # Plain data only: torch's safe loader read it, and nothing in it is a pickled object.
    torch.load(tiny_run / "checkpoints" / "last.pt", weights_only=True)
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["config"]["width"] == 8 and config["data"]["train"] == 576 and config["data"]["val"] == 64
    assert config["device"] == "cpu" and config["torch"] == torch.__version__


class Crash(Exception):
    pass


def crash_after(monkeypatch, step):
    """Make training die right after it writes the checkpoint of ``step``, as a killed process would."""
    real = engine.checkpoint.save

    def save(state, path):
        real(state, path)
        if path.name == "last.pt" and state["step"] == step:
            raise Crash

    monkeypatch.setattr(engine.checkpoint, "save", save)


@pytest.mark.parametrize("stop_step, changes", [
    (STEPS_PER_EPOCH, {}),  # stopped after epoch 1
    (12, {"checkpoint_every": 4, "schedule": "cosine"}),  # stopped mid-epoch 2
    (12, {"checkpoint_every": 4, "ema": 0.9, "tta": True}),  # the weight average resumes too
])
def test_resume_ends_with_the_same_weights(tmp_path, monkeypatch, stop_step, changes):
    whole = engine.train(tiny(tmp_path / "whole", **changes)).run_dir
    with monkeypatch.context() as m:
        crash_after(m, stop_step)
        with pytest.raises(Crash):
            engine.train(tiny(tmp_path / "resumed", **changes))
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == stop_step
    engine.train(resume=tmp_path / "resumed")
    a = load_checkpoint(whole / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key in ("model", "train_model") if "ema" in changes else ("model",):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    timing = ("seconds", "images_per_s")

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in timing} for r in rs]

    assert strip(read_metrics(whole)) == strip(read_metrics(tmp_path / "resumed"))


def test_same_seed_same_metrics_and_another_seed_differs(tiny_run, tmp_path):
    again = engine.train(tiny(tmp_path / "again")).run_dir
    other = engine.train(tiny(tmp_path / "other", seed=4, epochs=1)).run_dir

    def losses(d):
        return [r["loss"] for r in read_metrics(d) if r["kind"] == "step"]

    assert losses(again) == losses(tiny_run)
    assert losses(other) != losses(tiny_run)[:STEPS_PER_EPOCH]


def test_a_weight_average_is_what_the_run_scores_saves_and_evaluate_finds(tmp_path):
    run_dir = engine.train(tiny(tmp_path / "ema", ema=0.9, tta=True)).run_dir
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    averaged, trained = last["model"], last["train_model"]
    assert averaged.keys() == trained.keys()
    assert not torch.equal(averaged["fc.weight"], trained["fc.weight"])
    record = [r for r in read_metrics(run_dir) if r["kind"] == "epoch"][-1]
    scores = evaluate(run_dir / "checkpoints" / "last.pt", device="cpu", out=tmp_path / "eval")
    assert scores["tta"] is True  # as the run scored itself
    assert scores["top1"] == pytest.approx(record["test_acc"])
    assert scores["loss"] == pytest.approx(record["test_loss"], rel=1e-4)
    plain = evaluate(run_dir / "checkpoints" / "last.pt", device="cpu", out=tmp_path / "plain", tta=False)
    assert plain["tta"] is False and plain["loss"] != scores["loss"]
