"""``cnnlab report``: the HTML page, opened in a real browser (headless Chromium driven by Playwright).

The browser is Debian's ``chromium`` package (``.ci/run`` installs it, and ``playwright`` comes with
the ``test`` extra); nothing is downloaded. The screenshot of the page is kept in
``tests/artifacts/report.png`` (or ``$CNNLAB_TEST_ARTIFACTS``).
"""

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from cnnlab import cli
from cnnlab.inspect.registry import EXPLAINERS
from cnnlab.report import report
from cnnlab.report.page import SECTIONS

ARTIFACTS = Path(os.environ.get("CNNLAB_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
HOSTILE = "<img src=x onerror=alert(1)>"
DOLLARS = "cost $5 & $6"  # matplotlib would read $…$ as TeX; & must be escaped in HTML


class Opened:
    """A page opened from disk, with everything that went wrong while loading it."""

    def __init__(self, browser, path: Path):
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url[:80]}"))
        self.page.on("request", lambda r: self.requests.append(r.url[:80]))
        self.page.on("dialog", self._dialog)
        self.page.goto(path.resolve().as_uri(), wait_until="load")

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def images(self) -> list[dict]:
        return self.page.locator("img").evaluate_all(
            "imgs => imgs.map(i => ({src: i.getAttribute('src').slice(0, 40), complete: i.complete, "
            "width: i.naturalWidth, alt: i.getAttribute('alt')}))")


@pytest.fixture(scope="module")
def small_report(small_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert report(small_run, out=out, device="cpu") == out
    return out


def test_report_in_a_browser(small_run, small_report, browser, tmp_path):
    from cnnlab.evaluate import evaluate

    opened = Opened(browser, small_report)
    page = opened.page
    try:
        assert opened.errors == []
        assert opened.dialogs == []
        # Only the page itself is loaded from disk; everything else is inline.
        assert [u for u in opened.requests if not u.startswith("data:")] == [small_report.resolve().as_uri()]

        images = opened.images()
        assert len(images) >= 20
        bad = [i for i in images if not (i["complete"] and i["width"] > 0)]
        assert bad == [], f"images that did not decode: {bad}"
        assert all(i["src"].startswith("data:image/png;base64,") and i["alt"] for i in images)

        for sid, title in SECTIONS.items():
            section = page.locator(f"section#{sid}")
            assert section.count() == 1, sid
            text = section.inner_text()
            assert title in text and len(text) > len(title) + 20, f"section {sid} is empty: {text!r}"
            assert "could not" not in text, f"section {sid}: {text}"
        for sid in ("curves", "confusion", "filters", "features", "patterns", "explanations", "embedding"):
            assert page.locator(f"section#{sid} img.plot").count() >= 1, sid
        # Every CAM and attribution method is checked, beside the random-map baseline.
        rows = page.locator("section#explanations table#sanity tbody tr")
        assert rows.count() == len(EXPLAINERS) + 1
        assert [rows.nth(k).locator("td").first.inner_text() for k in range(rows.count())] == [
            *EXPLAINERS, "random map (baseline)"]
        assert page.locator("section#gradcam img.plot").count() == 2  # right and wrong predictions
        assert page.locator("section#misclassified figure.thumb img").count() >= 10
        assert page.locator("section#confused-pairs h3").count() >= 1
        assert page.locator("section#mistakes #top-losses figure.thumb img").count() == 24
        assert page.locator("section#mistakes table#typical tbody tr").count() == 10

        # The numbers on the page are the run's.
        epochs = [json.loads(line) for line in (small_run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in epochs if r["kind"] == "epoch"][-1]
        for split in ("train", "val", "test"):
            assert page.inner_text(f"#final-{split}-acc") == f"{100 * last[f'{split}_acc']:.2f}%"
        scored = evaluate(small_run, device="cpu", out=tmp_path / "eval")
        assert page.inner_text("#scored-test-acc") == f"{100 * scored['top1']:.2f}%"
        assert f"on the {scored['n']} test images" in page.inner_text("section#accuracy")
        table = page.inner_text("section#architecture")
        assert "conv5_x" in table and "fc" in table and "resnet18-cifar" in table

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of the report: {shot}")
        with Image.open(shot) as img:
            assert img.size[0] >= 1000 and img.size[1] > 5000
    finally:
        page.close()


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> tuple[Path, Path]:
    """A two-class folder dataset, one class named like an HTML tag, and a 1-epoch width-2 run on it."""
    import numpy as np

    from cnnlab.config import resolve
    from cnnlab.train.engine import train

    root = tmp_path_factory.mktemp("hostile") / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for k, name in enumerate([HOSTILE, DOLLARS]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                pixels[..., k] = 255  # one class reddish, the other greenish
                Image.fromarray(pixels).save(folder / f"{i}.png")
    cfg = resolve(overrides=dict(recipe="fast", dataset=f"folder:{root}", model="resnet18-cifar", width=2,
                                 image_size=16, epochs=1, batch_size=8, lr=0.05, device="cpu",
                                 out=str(root.parent / "run")))
    return train(cfg).run_dir, root


def test_class_names_are_text_not_markup(hostile_run, browser, capsys):
    run_dir, _ = hostile_run
    assert cli.main(["report", str(run_dir), "--device", "cpu"]) == 0
    out = run_dir / "report.html"
    assert f"wrote {out}" in capsys.readouterr().out
    assert HOSTILE not in out.read_text()  # only ever escaped

    opened = Opened(browser, out)
    try:
        assert opened.dialogs == []
        assert opened.errors == []
        assert opened.page.locator('img[src="x"]').count() == 0
        assert all(i["src"].startswith("data:image/png;base64,") and i["width"] > 0 for i in opened.images())
        text = opened.page.inner_text("body")
        assert HOSTILE in text
        assert HOSTILE in opened.page.inner_text("section#per-class")
        assert HOSTILE in opened.page.inner_text("section#summary")
        assert DOLLARS in opened.page.inner_text("section#per-class")
        assert "could not" not in text
    finally:
        opened.page.close()


def test_report_without_the_dataset_still_written(hostile_run, tmp_path):
    run_dir, root = hostile_run
    moved = root.rename(root.with_name("moved"))
    try:
        out = report(run_dir, out=tmp_path / "sub" / "r.html", device="cpu")
    finally:
        moved.rename(root)
    text = out.read_text()
    assert 'id="confusion"' in text and "needs the run&#x27;s test set" in text
    assert 'id="filters"' in text and "data:image/png;base64," in text
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]  # no temporary file left behind


def test_report_user_errors(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no metrics.jsonl" in err and err.count("\n") == 1
    (tmp_path / "f.txt").write_text("x")
    assert cli.main(["report", str(tmp_path / "f.txt")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_a_figure_that_fails_is_a_note_and_a_logged_warning(hostile_run, tmp_path, monkeypatch, caplog):
    import logging

    from cnnlab.inspect.results import Filters
    from cnnlab.visualize.figures import DRAW

    def broken(result):
        raise RuntimeError("out of ink")

    monkeypatch.setitem(DRAW, Filters, broken)
    with caplog.at_level(logging.WARNING, logger="cnnlab.report"):
        out = report(hostile_run[0], out=tmp_path / "r.html", device="cpu")
    assert "this part could not be drawn (RuntimeError: out of ink)" in out.read_text()
    assert [r.getMessage() for r in caplog.records] == ["section filters could not be drawn: RuntimeError: out of ink"]


def test_report_lists_the_bad_labels_the_inspection_finds(small_run, small_report):
    """The Bad labels section shows the candidates of confident learning on the run's validation split, as
    ``Inspection.kept_label_issues`` finds them (what ``cnnlab labels`` and the explorer show)."""
    import re

    from cnnlab.inspect import Inspection
    from cnnlab.report.sections import BAD_LABELS_SHOWN

    found = Inspection.open(small_run, device="cpu").kept_label_issues()
    section = small_report.read_text().split('<section id="bad-labels"><h2>Bad labels</h2>')[1].split("</section>")[0]
    assert f"the {found.examined} validation images" in section and f": {len(found.index)} image" in section
    shown = re.findall(r'alt="training image (\d+): given ([^,]+), suggested ([^"]+)"', section)
    expected = found.index[:BAD_LABELS_SHOWN].tolist()
    assert [int(i) for i, _, _ in shown] == expected
    assert [(g, s) for _, g, s in shown] == [(found.classes[int(g)], found.classes[int(s)])
                                           for g, s in zip(found.given[:len(expected)], found.suggested)]
