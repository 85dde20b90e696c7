"""--early-stop: a run whose validation figure stops improving ends at the right epoch, with best.pt as its
result, the same way when stopped and resumed, and says why it ended."""

import json

import pytest
import torch
from test_train import Crash, crash_after, read_metrics, tiny

from cnnlab import cli
from cnnlab.core import checkpoint
from cnnlab.core.checkpoint import load as load_checkpoint
from cnnlab.core.errors import UserError
from cnnlab.train import engine

SMALL = dict(width=4, limit_train=200, limit_test=64, val_split=40, epochs=12)  # 160 images: 3 steps an epoch
STEPS = 3
# What validation "measures" each epoch: the best is epoch 2, then nothing better (a tie is no progress).
SCRIPTS = {
    "val_acc": {1: 0.5, 2: 0.625, 3: 0.625, 4: 0.55, 5: 0.9},
    "val_loss": {1: 1.5, 2: 1.25, 3: 1.25, 4: 1.4, 5: 0.1},
}
REASONS = {
    "val_acc": "early stop: val_acc did not improve for 2 epochs (best 0.625 at epoch 2)",
    "val_loss": "early stop: val_loss did not improve for 2 epochs (best 1.25 at epoch 2)",
}


def scripted(monkeypatch, metric):
    """Validation reports ``SCRIPTS[metric]`` (after scoring for real), so that the plateau is known exactly."""
    real = engine.Trainer.evaluate

    def evaluate(self, record):
        record = real(self, record)
        record[metric] = SCRIPTS[metric][record["epoch"]]
        return record

    monkeypatch.setattr(engine.Trainer, "evaluate", evaluate)


@pytest.mark.parametrize("metric", ["val_acc", "val_loss"])
def test_a_plateau_ends_the_run_at_the_right_epoch_with_best_pt_as_its_result(tmp_path, monkeypatch, metric):
    scripted(monkeypatch, metric)
    result = engine.train(tiny(tmp_path / "run", early_stop=2, early_stop_metric=metric, **SMALL))
    epochs = [r for r in read_metrics(result.run_dir) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]  # best at 2; 3 and 4 no better
    assert result.step == 4 * STEPS and result.stopped == REASONS[metric]
    assert json.loads((result.run_dir / "config.json").read_text())["stopped"] == REASONS[metric]
    best = load_checkpoint(result.run_dir / "checkpoints" / "best.pt")
    assert best["step"] == 2 * STEPS
    assert best["best"] == {"metric": metric, "value": SCRIPTS[metric][2], "epoch": 2, "stale": 0}
    assert best["best_val_acc"] == epochs[1]["val_acc"]
    last = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert last["best"]["stale"] == 2
    # The figures the run reports as its result are best.pt's epoch, not the last one's.
    assert result.best == {k: v for k, v in epochs[1].items() if k != "kind"}
    assert result.last["epoch"] == 4


def test_resumed_mid_way_it_stops_at_the_same_epoch_with_the_same_weights(tmp_path, monkeypatch, capsys):
    scripted(monkeypatch, "val_acc")
    whole = engine.train(tiny(tmp_path / "whole", early_stop=2, **SMALL))
    with monkeypatch.context() as m:
        crash_after(m, 3 * STEPS)  # one epoch without progress counted, one to go
        with pytest.raises(Crash):
            engine.train(tiny(tmp_path / "resumed", early_stop=2, **SMALL))
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["best"]["stale"] == 1
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["stopped"] is None
    resumed = engine.train(resume=tmp_path / "resumed")
    assert (resumed.step, resumed.stopped) == (whole.step, whole.stopped) == (4 * STEPS, REASONS["val_acc"])
    for name in ("last.pt", "best.pt"):
        a = load_checkpoint(whole.run_dir / "checkpoints" / name)
        b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / name)
        assert a["step"] == b["step"] and a["best"] == b["best"]
        for key, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][key]), (name, key)
    assert resumed.best["test_acc"] == whole.best["test_acc"]
    # An ended run has nothing left to resume.
    assert cli.main(["train", "--resume", str(tmp_path / "resumed")]) == 2
    assert "already ended (early stop: val_acc did not improve for 2 epochs" in capsys.readouterr().err


def test_a_run_that_ends_early_says_so_and_reports_best_pt(tmp_path, monkeypatch, capsys):
    scripted(monkeypatch, "val_acc")
    argv = ["train", "--recipe", "fast", "--dataset", "sample", "--width", "4", "--image-size", "32",
            "--limit-train", "200", "--limit-test", "64", "--val-split", "40", "--epochs", "12",
            "--batch-size", "64", "--device", "cpu", "--early-stop", "2", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    best = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "epoch"][1]
    assert f"stopped after epoch 4, {REASONS['val_acc']}" in out
    assert f"result: best.pt, epoch 2: train_acc {best['train_acc']:.4f}, val_acc 0.6250, " \
           f"test_acc {best['test_acc']:.4f}" in out


def test_a_run_that_finishes_records_it(tmp_path):
    result = engine.train(tiny(tmp_path / "run", early_stop=5, **{**SMALL, "epochs": 2}))
    assert result.stopped == "finished" and result.best == {}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["stopped"] == "finished"


def test_early_stop_without_a_validation_split_is_refused(tmp_path, capsys):
    with pytest.raises(UserError, match="`early_stop` watches the validation split, which `val_split` 0"):
        tiny(tmp_path / "run", early_stop=2, val_split=0)
    argv = ["train", "--dataset", "sample", "--early-stop", "2", "--val-split", "0", "--out", str(tmp_path / "r")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--early-stop watches the validation split, which --val-split 0 leaves empty" in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="`early_stop` must be 1 or more epochs"):
        tiny(tmp_path / "run", early_stop=0)
    with pytest.raises(UserError, match="unknown early stop metric 'val_top5'"):
        tiny(tmp_path / "run", early_stop_metric="val_top5")


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    return engine.train(tiny(tmp_path_factory.mktemp("runs") / "run", **{**SMALL, "epochs": 1})).run_dir


@pytest.mark.parametrize("damage, why", [
    ({"stale": -1}, "best stale is -1"),
    ({"metric": "train_acc"}, "best watches 'train_acc'"),
    ({"value": float("nan")}, "best value is nan"),
])
def test_a_damaged_best_table_is_refused(one_epoch, tmp_path, damage, why):
    state = load_checkpoint(one_epoch / "checkpoints" / "last.pt")
    state["best"] = {**state["best"], **damage}
    state["checksum"] = checkpoint.tensor_digest(state)
    checkpoint.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=why):
        checkpoint.read(tmp_path / "bad.pt")
