"""Repeated seeds: a group of runs equals separate runs, resumes exactly, and summarises its figures."""

import json
import math
from statistics import stdev

import pytest
import torch

from cnnlab import cli
from cnnlab.config import resolve
from cnnlab.core.checkpoint import load as load_checkpoint
from cnnlab.core.errors import UserError
from cnnlab.train import engine
from cnnlab.train.seeds import read_group, spread, summary, train_group

# Two small epochs of 2 steps each (128 training images): 4 steps per seed.
SMALL = dict(recipe="fast", dataset="sample", model="resnet18-cifar", width=4, image_size=32, epochs=2,
             batch_size=64, lr=0.1, limit_train=192, limit_test=64, val_split=64, device="cpu")
STEPS = 4
TIMING = ("seconds", "images_per_s")


def small(**changes):
    return resolve(overrides={**SMALL, **changes})


def figures(run_dir):
    """metrics.jsonl without its timings: every figure that must repeat exactly."""
    lines = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if k not in TIMING} for r in lines]


def assert_same_run(a, b):
    assert figures(a) == figures(b)
    wa, wb = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Separate runs of seeds 0 and 1, the group of both (through the command line), and the same group
    stopped one step into its second seed, then resumed as a group."""
    root = tmp_path_factory.mktemp("seeds")
    separate = {s: engine.train(small(seed=s, out=str(root / f"alone-{s}"))).run_dir for s in (0, 1)}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    assert cli.main(["train", *args, "--seeds", "0", "1", "--out", str(root / "group")]) == 0
    stopped = train_group(small(out=str(root / "stopped")), [0, 1], stop_after=STEPS + 1)
    return separate, root / "group", stopped, root / "stopped"


def test_a_group_equals_separate_runs(runs):
    separate, group, _, _ = runs
    for s in (0, 1):
        assert_same_run(separate[s], group / f"seed-{s}")
    info = read_group(group)
    assert info["seeds"] == [0, 1]
    assert {s: r["status"] for s, r in info["runs"].items()} == {"0": "finished", "1": "finished"}
    assert info["config"]["width"] == 4 and "seed" not in info["config"]


def test_resuming_a_stopped_group_ends_identical(runs, capsys):
    _, group, stopped, stopped_dir = runs
    assert not stopped.finished and sorted(stopped.results) == [0, 1]
    assert stopped.results[1].step == 1  # the first seed's 4 steps, then one of the second's
    assert {s: r["status"] for s, r in read_group(stopped_dir)["runs"].items()} == {"0": "finished", "1": "stopped"}
    assert cli.main(["train", "--resume", str(stopped_dir)]) == 0
    assert "2 seeds (0 1)" in capsys.readouterr().out
    for s in (0, 1):
        assert_same_run(group / f"seed-{s}", stopped_dir / f"seed-{s}")
    again = train_group(resume=stopped_dir)  # nothing left: the finished runs are skipped
    assert again.finished and again.results == {}


def test_summary_is_the_spread_of_the_runs_final_figures(runs):
    separate, group, _, _ = runs
    s = summary(group)
    finals = [figures(separate[seed])[-1] for seed in (0, 1)]
    for key in ("train_acc", "val_acc", "test_acc", "test_loss"):
        values = [f[key] for f in finals]
        got = s["summary"][key]
        assert got["n"] == 2 and got["min"] == min(values) and got["max"] == max(values)
        assert math.isclose(got["mean"], sum(values) / 2) and math.isclose(got["std"] or 0, stdev(values))
    assert [r["seed"] for r in s["runs"]] == [0, 1] and all(r["epochs"] == 2 for r in s["runs"])
    assert s["summary"]["seconds"]["min"] > 0


def test_spread_interval_is_students_t():
    s = spread([0.80, 0.82, 0.84])
    assert math.isclose(s["mean"], 0.82) and math.isclose(s["std"], 0.02)
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert s["ci95"] == pytest.approx([0.82 - half, 0.82 + half])
    assert spread([0.5])["std"] is None and spread([0.5])["ci95"] is None


def test_bad_seeds_are_one_line(tmp_path):
    with pytest.raises(UserError, match="names a seed twice"):
        train_group(small(out=str(tmp_path / "g")), [1, 1])
    with pytest.raises(UserError, match="`seed`"):
        train_group(small(out=str(tmp_path / "g")), [-1])
    assert cli.main(["train", "--seeds", "0", "--seed", "1", "--out", str(tmp_path / "g")]) == 2
    assert not (tmp_path / "g").exists()
