"""``cnnlab demo`` end to end, shortened to one epoch (the real one is timed by hand: see README)."""

import json
import re

import pytest

from cnnlab import cli, demo
from cnnlab.run import load


@pytest.fixture
def one_epoch(monkeypatch):
    monkeypatch.setitem(demo.DEMO, "epochs", 1)


def test_demo_trains_evaluates_and_says_where(one_epoch, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    scores = json.loads((out / "eval" / "metrics.json").read_text())
    shown = float(re.search(r"test ([\d.]+)% on 1000 images", printed).group(1))
    assert shown == pytest.approx(100 * scores["top1"], abs=0.05)
    assert scores["n"] == 1000
    assert f"tensorboard --logdir {out / 'tb'}" in printed

    run = load(out)
    assert run.spec == {"name": "resnet18-cifar", "num_classes": 10, "width": 16, "image_size": 32,
                        "in_channels": 3}
    assert run.classes[:3] == ["airplane", "automobile", "bird"]
    epochs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1]


def test_demo_runs_twice_without_out(one_epoch, tmp_path, monkeypatch):
    # `make demo` twice in a row must not trip over the first run's folder.
    monkeypatch.chdir(tmp_path)
    first, second = demo.demo(), demo.demo()
    assert first != second
    assert (first / "checkpoints" / "last.pt").is_file() and (second / "checkpoints" / "last.pt").is_file()
