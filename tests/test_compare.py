"""``cnnlab compare``: several runs on one page, opened in headless Chromium as the report is."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from test_report import ARTIFACTS, HOSTILE, Opened

from cnnlab import cli
from cnnlab.config import resolve
from cnnlab.models.summary import summarize
from cnnlab.report.compare import compare, gather
from cnnlab.train.engine import train


@pytest.fixture(scope="module")
def two_runs(small_run, tmp_path_factory) -> list[Path]:
    """The session's small ResNet-18 run and a CIFAR ResNet-20 of two epochs, named to need escaping."""
    out = tmp_path_factory.mktemp("compare") / f"resnet20 {HOSTILE}"
    cfg = resolve(overrides=dict(recipe="fast", dataset="sample", model="resnet20", width=4, image_size=32, epochs=2,
                                 batch_size=64, lr=0.1, limit_train=256, limit_test=64, val_split=64, device="cpu",
                                 tta=False, out=str(out)))
    return [small_run, train(cfg).run_dir]


def test_compare_page_in_a_browser(two_runs, browser, tmp_path, capsys):
    page_path = tmp_path / "compare.html"
    assert cli.main(["compare", *map(str, two_runs), "--out", str(page_path)]) == 0
    printed = capsys.readouterr().out
    assert "resnet18-cifar w8" in printed and "resnet20 w4" in printed and f"resnet20 {HOSTILE}" in printed
    assert f"wrote {page_path}" in printed

    opened = Opened(browser, page_path)
    page = opened.page
    try:
        assert opened.errors == [] and opened.dialogs == []
        assert opened.requests == [page_path.resolve().as_uri()[:80]]
        images = opened.images()
        assert len(images) == 1 and images[0]["complete"] and images[0]["width"] > 600
        assert images[0]["src"].startswith("data:image/png;base64,")
        table = page.locator("#table table").inner_text()
        assert "resnet20 w4" in table and "resnet18-cifar w8" in table
        assert page.locator("main img").count() == 1  # the folder name is text, not markup
        assert HOSTILE in page.locator("#settings").inner_text() and HOSTILE in table
        rows = page.locator("#table tbody tr")
        assert rows.count() == 2
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "compare.png"
        page.screenshot(path=str(shot), full_page=True)
        assert Image.open(shot).size[1] > 600
    finally:
        page.close()


def test_compare_figures_match_the_runs(two_runs, tmp_path):
    out, runs, _ = compare(two_runs, out=tmp_path / "c.html")
    assert out.is_file()
    for run in runs:
        metrics = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        last = [m for m in metrics if m.get("kind") == "epoch"][-1]
        row = run.row()
        assert row["test_acc"] == last["test_acc"] and row["train_error"] == pytest.approx(1 - last["train_acc"])
        assert row["params"] > 0 and row["macs"] > 0 and row["images_per_s"] > 0
    assert runs[1].row()["epochs"] == 2
    assert runs[1].row()["params"] == summarize("resnet20", image_size=32, num_classes=10, width=4)["params"]
    same = gather([two_runs[1], two_runs[1]])
    assert same[0].name != same[1].name  # the same folder twice stays two rows


def test_compare_mistakes_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv in (["compare", str(tmp_path / "missing")], ["compare", str(tmp_path / "empty")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cnnlab compare: error:" in err
    assert not os.path.exists("compare.html") or Path("compare.html").stat().st_size > 0
