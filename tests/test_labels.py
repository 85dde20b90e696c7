"""Bad labels (``cnnlab labels``, confident learning): the confident joint against its definition and cleanlab's,
planted label errors found on the validation split and by K-fold cross-validation, the JSON and the file it
writes, bad input, and the explorer's panel (its route, and in Chromium a click that sends the image on).

The data: four classes of noisy flat colours, which a width-4 network learns in a few epochs, with 8% of the
training labels flipped to another class (``benchmarks.label_noise.write_noisy_folder``). A candidate is a
planted error when its pixels are a flipped image's.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pagewatch import watch
from starlette.testclient import TestClient

from benchmarks.label_noise import score_found, write_noisy_folder
from cnnlab import cli
from cnnlab.inspect import Inspection
from cnnlab.inspect.labels import LABEL_ISSUES_FILE, confident_joint, folds_of
from cnnlab.run import load
from cnnlab.serve import load_runs
from cnnlab.serve.app import create_app
from cnnlab.serve.jobs import Jobs

COLOURS = torch.tensor([[50, 60, 220], [40, 200, 60], [220, 40, 40], [230, 210, 50]])
CLASSES = ["blue", "green", "red", "yellow"]  # in the order a folder dataset sorts them
SIDE = 12
FLIPPED = 0.08


def _colours(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of flat colours, one class after another, darkened at random and with pixel noise."""
    y = torch.arange(n) % len(COLOURS)
    base = COLOURS[y].float()[:, :, None, None] * (0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=g))
    x = base + 25 * torch.randn(n, 3, SIDE, SIDE, generator=g)
    return x.clamp(0, 255).round().to(torch.uint8), y


def _train(data: Path, out: Path, **settings) -> Path:
    from cnnlab.config import resolve
    from cnnlab.train.engine import train

    base = dict(recipe="fast", dataset=f"folder:{data}", model="resnet18-cifar", width=4, image_size=SIDE, epochs=6,
                batch_size=50, lr=0.2, val_split=200, device="cpu", out=str(out))
    return train(resolve(overrides={**base, **settings})).run_dir


@pytest.fixture(scope="module")
def planted(tmp_path_factory, one_thread) -> tuple[Path, set[str]]:
    """A run on 600 training images (200 held out for validation), 8% of whose labels were flipped; the digests
    of the flipped images."""
    root = tmp_path_factory.mktemp("planted")
    g = torch.Generator().manual_seed(0)
    flipped = write_noisy_folder(root / "data", CLASSES, _colours(600, g), _colours(80, g), FLIPPED)
    return _train(root / "data", root / "run"), flipped


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


# --- the confident joint ---------------------------------------------------------------------------------


def test_confident_joint_by_hand_and_as_cleanlab_counts_it():
    from cleanlab.count import compute_confident_joint

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    probabilities = torch.tensor([[0.90, 0.05, 0.05],  # given 0, confidently 0
                                  [0.70, 0.20, 0.10],  # given 0, confident of nothing: not counted
                                  [0.10, 0.80, 0.10],  # given 1, confidently 1
                                  [0.85, 0.10, 0.05],  # given 1, confidently 0: a likely error
                                  [0.10, 0.10, 0.80],  # given 2, confidently 2
                                  [0.10, 0.50, 0.40]], dtype=torch.float64)  # given 2, confidently 1
    # Thresholds: the mean probability of each class over the images given it: 0.8, 0.45, 0.6.
    expected = [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert confident_joint(labels, probabilities).tolist() == expected
    assert compute_confident_joint(labels.numpy(), probabilities.numpy(), calibrate=False).tolist() == expected

    # On many images, with classes that several images reach at once (the likeliest one counts) and a class
    # no image is given (no threshold is reachable), it is cleanlab's count, cell for cell.
    g = np.random.default_rng(0)
    for k in (2, 5, 10):
        p = g.dirichlet(np.full(k, 0.3), size=400)
        y = np.where(g.random(400) < 0.7, p.argmax(1), g.integers(0, k - 1, 400))
        ours = confident_joint(torch.from_numpy(y), torch.from_numpy(p))
        assert ours.tolist() == compute_confident_joint(y, p, calibrate=False).tolist()
        assert ours.diagonal().min() >= 1


def test_images_of_one_class_are_refused_in_one_line():
    from cnnlab.core.errors import UserError
    from cnnlab.inspect.labels import _result

    class Run:  # what _result reads of a loaded run
        classes, path = CLASSES, Path("unused")

    with pytest.raises(UserError, match="hold 1 class") as e:
        _result(Run(), "validation", None, torch.arange(3), torch.zeros(3, dtype=torch.long),
                torch.full((3, 4), 0.25, dtype=torch.float64), [])
    assert "\n" not in str(e.value) and "`val_split`" in str(e.value)


def test_folds_are_stratified_and_fixed():
    labels = torch.tensor([0] * 30 + [1] * 12 + [2] * 7)
    fold = folds_of(labels, 3)
    assert torch.equal(fold, folds_of(labels, 3))
    for c, n in ((0, 30), (1, 12), (2, 7)):
        counts = torch.bincount(fold[labels == c], minlength=3)
        assert counts.sum() == n and counts.max() - counts.min() <= 1


# --- planted errors ------------------------------------------------------------------------------------


def test_planted_errors_are_found_on_the_validation_split(planted, capsys):
    run_dir, flipped = planted
    before = _snapshot(run_dir)
    assert cli.main(["labels", str(run_dir), "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)

    loaded = load(run_dir)
    held = loaded.splits()
    found = score_found(loaded, printed, flipped, held.val_x.read())
    assert found["planted"] >= 8  # about 8% of the 200 held-out images
    assert found["recall"] >= 0.8 and found["precision"] >= 0.6, found

    # The document: where it came from, the counts, each candidate, and the file it is kept in.
    assert printed["source"] == "validation" and printed["folds"] is None
    assert printed["examined"] == 200 and printed["found"] == len(printed["issues"])
    assert printed["classes"] == CLASSES and len(printed["confident_joint"]) == len(CLASSES)
    val_index = held.val_index.tolist()
    confidences = [issue["self_confidence"] for issue in printed["issues"]]
    assert confidences == sorted(confidences)  # most likely wrong first
    for rank, issue in enumerate(printed["issues"], start=1):
        assert issue["rank"] == rank and issue["index"] in val_index
        assert issue["given"] == CLASSES[issue["given_class"]]
        assert issue["suggested"] == CLASSES[issue["suggested_class"]]
        assert issue["given"] == CLASSES[int(held.val_y[val_index.index(issue["index"])])]
        assert 0 <= issue["self_confidence"] <= issue["suggested_probability"] <= 1
    file = Path(printed.pop("file"))
    assert file == run_dir / LABEL_ISSUES_FILE and json.loads(file.read_text()) == printed
    # Nothing else in the run folder changed.
    after = _snapshot(run_dir)
    assert set(after) - set(before) == {LABEL_ISSUES_FILE}
    assert {k: v for k, v in after.items() if k != LABEL_ISSUES_FILE} == before

    # The same candidates as the inspection finds directly, and read back from the file.
    direct = Inspection(loaded).label_issues()
    assert direct.index.tolist() == [issue["index"] for issue in printed["issues"]]
    kept = Inspection(loaded).kept_label_issues()
    assert kept.file == str(file) and kept.to_json() == printed


def test_planted_errors_are_found_by_cross_validation(planted):
    run_dir, flipped = planted
    loaded = load(run_dir)
    held = loaded.splits()
    result = Inspection(loaded).label_issues(folds=2)
    assert result.source == "cross-validation" and result.folds == 2 and result.examined == 400
    assert len(result.fold_accuracy) == 2 and min(result.fold_accuracy) > 0.5
    assert set(result.index.tolist()) <= set(held.train_index.tolist())
    found = score_found(loaded, result.to_json(), flipped, held.train_x.read())
    assert found["planted"] >= 20  # about 8% of the 400 training images
    assert found["recall"] >= 0.6 and found["precision"] >= 0.3, found
    # The copies were trained elsewhere: the run folder holds no trace of them.
    assert not any("fold" in p.name for p in run_dir.rglob("*"))


# --- bad input -------------------------------------------------------------------------------------------


def test_bad_input_is_one_line(planted, tmp_path, capsys):
    run_dir, _ = planted
    data = Path(load(run_dir).config.dataset.removeprefix("folder:"))
    no_val = _train(data, tmp_path / "no-val", val_split=0, epochs=1, width=2)
    capsys.readouterr()  # training's lines
    for argv, words in (([str(no_val)], ("validation split", "--val-split", "--folds")),
                        ([str(run_dir), "--folds", "1"], ("--folds must be", "at least 2")),
                        ([str(run_dir), "--folds", "0"], ("--folds must be",)),
                        ([str(run_dir), "--folds", "10000"], ("--folds 10000", "400 training images")),
                        ([str(no_val / "checkpoints" / "missing.pt")], ("does not exist",))):
        assert cli.main(["labels", *argv, "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("cnnlab labels: error: ") and "Traceback" not in err, err
        assert all(w in err for w in words), (argv, err)
        assert "`" not in err
    assert not (no_val / LABEL_ISSUES_FILE).exists()


# --- the explorer ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_copy(planted, tmp_path_factory) -> Path:
    """The planted run without a kept label_issues.json: the explorer computes the validation split's."""
    copy = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(planted[0], copy, ignore=shutil.ignore_patterns(LABEL_ISSUES_FILE, "explore"))
    # The explorer's one worker computes the trust table first (minutes on a busy CPU) unless the run has the
    # checks of `cnnlab visualize sanity`: an empty table here, so that the worker comes to the bad labels at once.
    (copy / "viz" / "sanity").mkdir(parents=True)
    (copy / "viz" / "sanity" / "sanity.json").write_text(json.dumps({"methods": {}}))
    return copy


def test_explorer_route_lists_the_inspections_candidates(served_copy):
    direct = Inspection(load(served_copy)).label_issues()
    with TestClient(create_app(load_runs([served_copy], jobs=Jobs(idle=3.0))), base_url="http://127.0.0.1:8000") as c:
        deadline = time.monotonic() + 120
        while (d := c.get("/api/0/labels").json())["state"] != "done":
            assert d["state"] in ("queued", "running") and time.monotonic() < deadline, d
            time.sleep(0.05)
        r = d["result"]
        assert r["source"] == "validation" and not r["kept"] and r["found"] == len(direct.index)
        assert [i["index"] for i in r["issues"]] == direct.index.tolist()[:len(r["issues"])]
        assert [i["given_class"] for i in r["issues"]] == direct.given.tolist()[:len(r["issues"])]
        first = r["issues"][0]
        assert first["ref"] == f"l0-{first['index']}" and first["thumb"].startswith("data:image/png;base64,")
        # A candidate's reference is an image the other panels take, with its given label in its name.
        shown = c.get(f"/api/0/predict?image={first['ref']}").json()
        assert shown["image"] == f"training image {first['index']} (given label {first['given']})"
        assert len(shown["top"]) == len(CLASSES)
        assert c.get("/api/0/predict?image=l0-999999").status_code == 404
        assert c.get("/api/0/predict?image=l1-0").status_code == 404
    assert (served_copy / "explore" / "bad-labels.json").is_file()  # cached like the other heavy results
    assert not (served_copy / LABEL_ISSUES_FILE).exists()


def test_bad_labels_panel_in_a_browser(served_copy, browser):
    from test_serve import Server

    server = Server([served_copy], served_copy.parent / "serve.log")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    seen = watch(page)
    try:
        page.goto(server.url, wait_until="load")
        thumbs = page.locator("#bad-labels figure")
        thumbs.first.wait_for(timeout=120_000)
        assert "likely label errors" in page.inner_text("#labels-caption")
        ref = thumbs.first.get_attribute("data-ref")
        index = int(ref.split("-")[1])
        thumbs.first.click()
        page.wait_for_function("() => document.getElementById('input-caption').textContent.includes('training image')")
        assert f"training image {index} (given label " in page.inner_text("#input-caption")
        page.locator("#top5 tbody tr").nth(3).wait_for()
    finally:
        page.close()
        server.stop()
    assert seen.errors == [] and seen.dialogs == []
    assert seen.hosts <= {"127.0.0.1", "data"}, seen.hosts
