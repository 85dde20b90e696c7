"""cnnlab lr-find: an exponential learning-rate sweep on a copy of the model that stops when the loss
diverges, with two suggestions inside the swept range, and no run folder written."""

import json
import math

import numpy as np
import pytest
import torch
from test_train import tiny

from cnnlab import cli
from cnnlab.core.errors import UserError
from cnnlab.models import build
from cnnlab.train.lr_find import lr_find, suggestions

TOY = dict(width=4, limit_train=160, limit_test=32, val_split=0, batch_size=32)  # 5 steps an epoch


@pytest.fixture(scope="module")
def gentle(tmp_path_factory):
    """A sweep over rates too low to diverge, of a model given to it, from an empty folder."""
    folder = tmp_path_factory.mktemp("sweep")
    cfg = tiny(folder / "run", **TOY)
    model = build(cfg.model, num_classes=10, width=cfg.width)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = lr_find(cfg, steps=12, start_lr=1e-5, end_lr=1e-1, model=model)
    return result, model, before, folder


def test_the_rates_grow_exponentially_from_start_to_end(gentle):
    result = gentle[0]
    assert len(result.lrs) == len(result.losses) == len(result.smoothed) == 12 and not result.diverged
    assert result.lrs[0] == pytest.approx(1e-5, rel=1e-9) and result.lrs[-1] == pytest.approx(1e-1, rel=1e-9)
    ratios = np.diff(np.log(result.lrs))
    assert np.allclose(ratios, math.log(1e4) / 11, rtol=1e-9)
    # The smoothed loss is the bias-corrected exponential average of the losses (beta 0.98).
    average = 0.0
    for i, loss in enumerate(result.losses):
        average = 0.98 * average + 0.02 * loss
        assert result.smoothed[i] == pytest.approx(average / (1 - 0.98 ** (i + 1)), rel=1e-9)


def test_the_suggestions_lie_inside_the_sweep(gentle):
    result = gentle[0]
    for lr in (result.steepest, result.valley):
        assert lr in result.lrs and 1e-5 <= lr <= 1e-1
    assert result.recipe_lr == 0.1  # the configuration's own rate, for the plot


def test_the_model_given_is_not_modified_and_no_run_folder_is_written(gentle):
    _, model, before, folder = gentle
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert list(folder.iterdir()) == []


def test_a_rate_too_high_diverges_and_stops_early(tmp_path):
    result = lr_find(tiny(tmp_path / "run", **TOY), steps=60, start_lr=1e-2, end_lr=1e7)
    assert result.diverged and 2 <= len(result.lrs) < 60
    assert result.smoothed[-1] > 4 * min(result.smoothed) or not math.isfinite(result.losses[-1])
    assert not (tmp_path / "run").exists()


def test_the_suggestions_on_a_known_curve():
    lrs = list(np.logspace(-6, 0, 61))  # ten points a decade
    # Falls fastest (against log10 lr) at 1e-3, then rises after 1e-1.
    smoothed = [1 - 1 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + max(0.0, math.log10(lr) + 1) ** 2
                for lr in lrs]
    steepest, valley = suggestions(lrs, smoothed, steps=61)
    assert steepest == pytest.approx(1e-3, rel=1e-6)
    # The window is lrs[6:56]; the longest descent runs from its start to the minimum at 1e-1 (index 50),
    # and the valley lies half-way along it: fastai's start + ⌊span/3⌋ + ⌊span/6⌋.
    lo, start, end = 6, -1, 50 - 6
    span = (end - start) / 3
    assert valley == lrs[lo + start + int(span) + int(span / 2)]
    assert suggestions(lrs[:2], smoothed[:2], steps=61) == (None, None)


def test_bad_sweeps_are_refused(tmp_path):
    cfg = tiny(tmp_path / "run", **TOY)
    with pytest.raises(UserError, match="`steps` must be a whole number between 2"):
        lr_find(cfg, steps=1)
    with pytest.raises(UserError, match=r"`end_lr` \(1e-05\) must be greater than `start_lr` \(0.001\)"):
        lr_find(cfg, start_lr=1e-3, end_lr=1e-5)


def test_the_command_plots_prints_and_writes_no_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["lr-find", "--recipe", "fast", "--dataset", "sample", "--width", "4", "--limit-train", "160",
            "--limit-test", "32", "--val-split", "0", "--batch-size", "32", "--device", "cpu", "--steps", "10",
            "--start-lr", "1e-4", "--end-lr", "1"]
    assert cli.main(argv + ["--json", "--out", "sweep.png"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["lrs"]) == 10 and doc["lrs"][-1] == pytest.approx(1.0) and doc["recipe_lr"] == 0.4
    assert doc["plot"] == "sweep.png" and (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "suggested: --lr" in out and "Lightning issues #1767, #21141" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr-find.png", "sweep.png"]  # no runs/ folder
    assert cli.main(argv + ["--steps", "1"]) == 2
    assert "--steps must be a whole number between 2 and 1000" in capsys.readouterr().err
