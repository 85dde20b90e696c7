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
from cnnlab.core.significance import mcnemar, spread, welch
from cnnlab.train import engine
from cnnlab.train.seeds import read_group, summary, train_group

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


def best_test_acc(run_dir):
    """The test accuracy logged at the epoch best.pt holds: the first of the best validation accuracy."""
    epochs = [r for r in figures(run_dir) if r["kind"] == "epoch"]
    return max(epochs, key=lambda r: (r["val_acc"], -r["epoch"]))["test_acc"]


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


def test_mcnemar_on_a_known_table():
    # 10 images only A gets right, 2 only B, 5 both, 3 neither: p = 2 * P(Binomial(12, 1/2) >= 10) = 2 * 79 / 4096.
    a = torch.tensor([1] * 10 + [0] * 2 + [1] * 5 + [0] * 3, dtype=torch.bool)
    b = torch.tensor([0] * 10 + [1] * 2 + [1] * 5 + [0] * 3, dtype=torch.bool)
    t = mcnemar(a, b)
    assert t["table"] == {"both_right": 5, "a_only": 10, "b_only": 2, "both_wrong": 3}
    assert t["p"] == pytest.approx(158 / 4096) and round(t["p"], 4) == 0.0386
    assert t["verdict"].startswith("significant at 5%: p = 0.0386")
    same = mcnemar(a, a)
    assert same["p"] == 1.0 and same["verdict"].startswith("not significant at 5%: p = 1")
    assert welch([0.8, 0.8], [0.8, 0.8])["p"] == 1.0


def test_compare_tests_runs_and_groups(runs, tmp_path, capsys):
    separate, group, _, stopped_dir = runs
    page = tmp_path / "c.html"
    paths = [group, stopped_dir, separate[0], group / "seed-0", separate[1]]
    assert cli.main(["compare", *map(str, paths), "--out", str(page), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["run"]: r for r in out["runs"]}
    s = summary(group)["summary"]
    assert rows["group"]["group"] and rows["group"]["seeds"] == [0, 1]
    assert rows["group"]["test_acc"] == pytest.approx(s["test_acc"]["mean"])
    assert rows["group"]["spread"]["test_acc"]["std"] == pytest.approx(s["test_acc"]["std"])
    tests = {(t["a"], t["b"]): t for t in out["tests"]}
    # The same weights on the same images: no discordant pair, p = 1.
    same = tests[("alone-0", "seed-0")]
    assert same["test"] == "mcnemar" and same["p"] == 1.0 and same["table"]["a_only"] == same["table"]["b_only"] == 0
    assert same["table"]["both_right"] + same["table"]["both_wrong"] == 64
    other = tests[("alone-0", "alone-1")]
    right = [best_test_acc(separate[s]) for s in (0, 1)]
    t = other["table"]
    assert (t["both_right"] + t["a_only"]) / 64 == pytest.approx(right[0])
    assert (t["both_right"] + t["b_only"]) / 64 == pytest.approx(right[1])
    # Two identical groups: Welch's test finds nothing; a run against a group is not paired.
    assert tests[("group", "stopped")]["test"] == "welch" and tests[("group", "stopped")]["p"] == 1.0
    assert tests[("group", "alone-0")]["test"] is None
    html = page.read_text()
    assert "Do they differ?" in html and "McNemar" in html and "not significant at 5%: p = 1" in html
    assert cli.main(["report", str(group)]) == 0
    report = (group / "report.html").read_text()
    assert "95% interval" in report and "seed-1" in report and "data:image/png;base64," in report
