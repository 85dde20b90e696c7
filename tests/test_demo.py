"""``cnnlab demo`` end to end, shortened to one epoch (the real one is timed by hand: see README)."""

import json
import re

import pytest
from PIL import Image

from cnnlab import cli, demo
from cnnlab.run import load


@pytest.fixture
def one_epoch(monkeypatch):
    from cnnlab.inspect.registry import METHODS

    monkeypatch.setitem(demo.DEMO, "epochs", 1)
    monkeypatch.setitem(METHODS["sanity"].quick, "count", 2)  # the report's explanations on two images


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
    assert run.spec.to_dict() == {"name": "resnet18-cifar", "num_classes": 10, "width": 16, "in_channels": 3}
    assert run.preprocess.size == 32
    assert run.classes[:3] == ["airplane", "automobile", "bird"]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1]

    # The gallery: conv1 filters, feature maps of one test image, Grad-CAM of four.
    assert f"inside the net:  {out / 'viz'}" in printed
    gallery = {p.relative_to(out / "viz").as_posix() for p in (out / "viz").rglob("*.png")}
    assert gallery == {"filters/conv1.png", "filters/conv1_filter0.png", "features/conv1_test300.png",
                       "features/conv5_x_test300.png", "cam/conv5_x_test0+3.png"}
    for name in gallery:
        png = Image.open(out / "viz" / name)
        assert png.format == "PNG" and png.size[0] > 400 and len(png.getcolors(1 << 20) or range(500)) > 50
    # The conv5_x grid shows all 128 channels of the width-16 model: wider than tall, beside the input.
    features = Image.open(out / "viz" / "features" / "conv5_x_test300.png")
    assert features.size[0] > features.size[1]

    # The report: one self-contained page in the run folder; then, last, the command that explores the run.
    lines = printed.rstrip().splitlines()
    assert lines[-4].startswith(f"  report:          {out / 'report.html'}")
    assert lines[-1] == f"  cnnlab serve {out}"
    page = (out / "report.html").read_text()
    assert 'id="misclassified"' in page and "data:image/png;base64," in page
    assert '<table id="sanity">' in page  # the explanations' checks


def test_demo_runs_twice_without_out(one_epoch, tmp_path, monkeypatch):
    # `make demo` twice in a row must not trip over the first run's folder. The two runs are likely to
    # start within one second; training, evaluation and checkpoints are what could collide, so the
    # gallery and report (tested above) are left out and the runs are small.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(demo.DEMO, "limit_train", 256)
    monkeypatch.setitem(demo.DEMO, "limit_test", 64)
    monkeypatch.setattr(demo, "gallery", lambda run_dir: [])
    monkeypatch.setattr(demo, "report", lambda run_dir, device: run_dir / "report.html")
    first, second = demo.demo(), demo.demo()
    assert first != second
    assert (first / "checkpoints" / "last.pt").is_file() and (second / "checkpoints" / "last.pt").is_file()
