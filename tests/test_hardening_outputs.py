"""Hardening of what a run leaves behind (#25, items 13-15): the training state in a checkpoint, weights
files given to ``--weights``, and the outputs of ``evaluate`` and ``report``.

Each test is a file or a request that used to end in a traceback, a silent gradient ascent or an
allocation of gigabytes; each now ends in one line (exit status 2) or in a bounded output.
Models are tiny (width 2, 8 px) so that the module runs in well under a minute.
"""

import json
import math

import pytest
import torch

from cnnlab import cli, run
from cnnlab.core import checkpoint
from cnnlab.core.spec import ModelSpec, Preprocess
from cnnlab.models import build

STEPS = 4  # 64 training images of the sample in batches of 16


def tiny(out, *extra):
    return ["train", "--recipe", "fast", "--dataset", "sample", "--model", "resnet18-cifar", "--width", "2",
            "--image-size", "8", "--batch-size", "16", "--limit-train", "64", "--limit-test", "20",
            "--val-split", "0", "--device", "cpu", "--seed", "3", "--out", str(out), *extra]


def one_error_line(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """Two epochs of a one-cycle schedule asked for, stopped after the first: resumable."""
    out = tmp_path_factory.mktemp("outputs") / "run"
    assert cli.main(tiny(out, "--epochs", "2", "--stop-after", str(STEPS))) == 0
    return out


# --- 13. the optimizer's and the scheduler's state ---------------------------------------------------


def group0(field, value):
    return lambda s: s["optimizer"]["param_groups"][0].update({field: value})


def sched(field, value):
    return lambda s: s["scheduler"].update({field: value})


def second_group(state):
    """A consistent second parameter group, with no parameters: the model has one."""
    state["optimizer"]["param_groups"].append(dict(state["optimizer"]["param_groups"][0], params=[]))
    for key in ("base_lrs", "_last_lr"):
        state["scheduler"][key].append(state["scheduler"][key][0])


TRAINING_STATE = {  # how the saved state is edited → the field the message must name
    "lr text": (group0("lr", "abc"), "optimizer.param_groups[0].lr is 'abc'"),
    "lr negative": (group0("lr", -1.0), "optimizer.param_groups[0].lr is -1.0"),
    "lr 0 mid-schedule": (group0("lr", 0.0), "optimizer.param_groups[0].lr is 0.0"),
    "momentum NaN": (group0("momentum", float("nan")), "optimizer.param_groups[0].momentum is nan"),
    "momentum 1": (group0("momentum", 1.0), "optimizer.param_groups[0].momentum is 1.0"),
    "weight decay negative": (group0("weight_decay", -5e-4), "optimizer.param_groups[0].weight_decay is -0.0005"),
    "initial lr infinite": (group0("initial_lr", math.inf), "optimizer.param_groups[0].initial_lr is inf"),
    "max lr text": (group0("max_lr", "x"), "optimizer.param_groups[0].max_lr is 'x'"),
    "maximize": (group0("maximize", True), "optimizer.param_groups[0].maximize is True"),
    "params not indices": (group0("params", ["w"]), "optimizer.param_groups[0].params"),
    "a second group": (second_group,
                       "optimizer.param_groups has 2 groups, but the run trains its parameters in 1"),
    "momentum NaN buffer": (lambda s: s["optimizer"]["state"][0].update(
        momentum_buffer=torch.full_like(s["optimizer"]["state"][0]["momentum_buffer"], float("nan"))),
        "optimizer.state[0].momentum_buffer holds NaN or infinity"),
    "momentum buffer of another shape": (lambda s: s["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(3)),
                                         "optimizer.state[0].momentum_buffer has shape [3]"),
    "last_epoch text": (sched("last_epoch", "abc"), "scheduler.last_epoch is 'abc'"),
    "last_epoch -2": (sched("last_epoch", -2), "scheduler.last_epoch is -2"),
    "last_epoch past the step": (sched("last_epoch", STEPS + 3), f"scheduler.last_epoch is {STEPS + 3}, but the "
                                                                   f"checkpoint is at step {STEPS}"),
    "base_lrs NaN": (sched("base_lrs", [float("nan")]), "scheduler.base_lrs[0] is nan"),
    "total_steps 0": (sched("total_steps", 0), "scheduler.total_steps is 0"),
    "phase names no rate": (lambda s: s["scheduler"]["_schedule_phases"][0].update(start_lr="lr; rm -rf"),
                            "scheduler._schedule_phases[0].start_lr is 'lr; rm -rf'"),
}


@pytest.mark.parametrize("case", TRAINING_STATE)
def test_a_resume_of_an_edited_training_state_is_one_line_and_writes_nothing(stopped_run, tmp_path, capsys, case):
    import shutil

    change, field = TRAINING_STATE[case]
    a_run = shutil.copytree(stopped_run, tmp_path / "run")
    path = a_run / "checkpoints" / "last.pt"
    state = checkpoint.load(path)
    change(state)
    state["checksum"] = checkpoint.tensor_digest(state)  # as a careful editor (or a bug of ours) would leave it
    torch.save(state, path)
    before = {p.relative_to(a_run): p.read_bytes() for p in a_run.rglob("*") if p.is_file()}
    err = one_error_line(capsys, ["train", "--resume", str(a_run)])
    assert str(path) in err and field in err, err
    after = {p.relative_to(a_run): p.read_bytes() for p in a_run.rglob("*") if p.is_file()}
    assert after == before  # nothing overwritten, nothing added


def test_the_state_a_run_saves_passes_the_checks_and_resumes(stopped_run, tmp_path):
    import shutil

    a_run = shutil.copytree(stopped_run, tmp_path / "run")
    training = checkpoint.read(a_run / "checkpoints" / "last.pt").training
    assert training["scheduler"]["last_epoch"] == STEPS and training["optimizer"]["param_groups"][0]["lr"] > 0
    assert cli.main(["train", "--resume", str(a_run)]) == 0
    # At its end one-cycle extrapolates below 0 (torch's arithmetic): the finished run still reads.
    finished = checkpoint.read(a_run / "checkpoints" / "last.pt")
    assert finished.step == 2 * STEPS and finished.training["optimizer"]["param_groups"][0]["lr"] < 0


def test_a_cosine_schedule_that_reached_its_end_may_hold_lr_0(stopped_run, tmp_path):
    # cosine ends at exactly 0 (a checkpoint of the last step): that is its schedule, not damage.
    state = checkpoint.load(stopped_run / "checkpoints" / "last.pt")
    group = state["optimizer"]["param_groups"][0]
    for key in ("max_lr", "min_lr"):
        group.pop(key)
    group["lr"] = 0.0
    state["scheduler"] = {"T_max": STEPS, "eta_min": 0.0, "base_lrs": [group["initial_lr"]], "last_epoch": STEPS,
                          "_step_count": STEPS + 1, "_is_initial": False, "_get_lr_called_within_step": False,
                          "_last_lr": [0.0]}
    state["checksum"] = checkpoint.tensor_digest(state)
    torch.save(state, tmp_path / "end.pt")
    assert checkpoint.read(tmp_path / "end.pt").training["optimizer"]["param_groups"][0]["lr"] == 0.0
    state["scheduler"]["T_max"] = STEPS + 1
    torch.save(state, tmp_path / "mid.pt")
    with pytest.raises(checkpoint.UserError, match=r"optimizer.param_groups\[0\].lr is 0.0"):
        checkpoint.read(tmp_path / "mid.pt")


# --- 14. --weights files ------------------------------------------------------------------------------


def weights_file(tmp_path, change):
    state = build("resnet18-cifar", num_classes=10, width=2, in_channels=3).state_dict()
    change(state)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    return path


WEIGHTS = {
    "an integer key": (lambda s: s.update({3: torch.zeros(1)}),
                       "keys of a state dict must be text (parameter names), not 3"),
    "a sparse tensor": (lambda s: s.update({"fc.weight": s["fc.weight"].to_sparse()}),
                        "fc.weight is a sparse tensor; weights must be dense"),
    "NaN weights": (lambda s: s["conv1.0.weight"].view(-1).__setitem__(5, float("nan")),
                    "non-finite values (NaN or infinity) in conv1.0.weight"),
}


@pytest.mark.parametrize("case", WEIGHTS)
def test_a_weights_file_that_cannot_be_trained_from_is_one_line(tmp_path, capsys, case):
    change, message = WEIGHTS[case]
    path = weights_file(tmp_path, change)
    out = tmp_path / "run"
    err = one_error_line(capsys, tiny(out, "--epochs", "1", "--weights", str(path)))
    assert str(path) in err and message in err, err
    assert "last good checkpoint" not in err and not out.exists()


# --- 15. outputs: evaluate on many classes, report --out -----------------------------------------------


def test_evaluate_on_100000_classes_keeps_the_confusion_matrix_sparse(tmp_path, monkeypatch, capsys):
    classes = [f"c{i}" for i in range(100_000)]
    spec = ModelSpec("resnet18-cifar", len(classes), 1, 3)
    torch.manual_seed(0)
    model = build(spec.name, num_classes=spec.num_classes, width=1, in_channels=3)
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    checkpoint.write(checkpoint.Checkpoint(model.state_dict(), spec, Preprocess(8, 3), classes,
                                           {"dataset": "sample"}), path)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 0, 5, 5, 5, 99_999, 99_999, 7, 7, 7, 7, 123])
    # No dataset of 100,000 classes at hand: the run's test set is these twelve images.
    monkeypatch.setattr(run.LoadedRun, "test_set", lambda self, *args: (images, labels))
    assert cli.main(["evaluate", str(tmp_path / "run"), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "confusion matrix of 100000 classes" in captured.err and "confusion_cells" in captured.err
    assert "confusion.png" not in captured.out

    saved = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert not (tmp_path / "run" / "eval" / "confusion.png").exists()
    with torch.no_grad():
        predicted = model.eval()(Preprocess(8, 3).to_input(images)).argmax(1)
    expected = {}
    for t, p in zip(labels.tolist(), predicted.tolist()):
        expected[(t, p)] = expected.get((t, p), 0) + 1
    assert saved["confusion"] is None
    assert {(t, p): c for t, p, c in saved["confusion_cells"]} == expected
    assert sum(c for _, _, c in saved["confusion_cells"]) == 12 and saved["n"] == 12
    assert saved["top1"] == pytest.approx((predicted == labels).float().mean().item())
    assert saved["per_class"]["c7"] == expected.get((7, 7), 0) / 4
    assert saved["per_class"]["c5"] == expected.get((5, 5), 0) / 3
    assert saved["per_class"]["c1"] is None and len(saved["per_class"]) == 100_000


def test_a_dense_confusion_matrix_is_kept_up_to_the_bound():
    from cnnlab.core.metrics import DENSE_CONFUSION_CLASSES, Scores, breakdown

    k = DENSE_CONFUSION_CLASSES
    labels = torch.tensor([0, k - 1, k - 1, 2])
    result = breakdown(Scores(0.5, 0.5, torch.tensor([0, k - 1, 0, 3]), labels), [f"c{i}" for i in range(k)])
    assert "confusion_cells" not in result and len(result["confusion"]) == k
    assert result["confusion"][k - 1][k - 1] == 1 and result["confusion"][k - 1][0] == 1
    assert result["confusion"][2][3] == 1 and sum(map(sum, result["confusion"])) == 4
    assert result["per_class"]["c2"] == 0.0 and result["per_class"][f"c{k - 1}"] == 0.5


def test_report_into_a_folder_that_cannot_be_made_is_one_line(stopped_run, monkeypatch, capsys):
    import cnnlab.report

    # The page itself is not what is tested: only where it goes.
    monkeypatch.setattr(cnnlab.report, "gather", lambda run_dir, device, **_: run_dir)
    monkeypatch.setattr(cnnlab.report, "render", lambda contents: "<!doctype html>")
    err = one_error_line(capsys, ["report", str(stopped_run), "--out", "/proc/cnnlab-report/x.html"])
    assert "cannot write --out /proc/cnnlab-report/x.html" in err, err


def test_report_help_says_that_out_creates_its_folder(capsys):
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    assert "created" in " ".join(capsys.readouterr().out.split())


def test_the_confusion_picture_of_1000_classes_stays_a_drawable_size():
    from cnnlab.evaluate import MAX_FIGURE_INCHES, confusion_figure

    k = 1000  # at 0.55 in a class, 553 in: over matplotlib's 2^16 pixels a side at 120 dpi
    result = {"confusion": torch.eye(k, dtype=torch.long).tolist(), "top1": 1.0, "n": k}
    fig = confusion_figure(result, [f"c{i}" for i in range(k)])
    width, height = fig.get_size_inches()
    assert height == MAX_FIGURE_INCHES and width == MAX_FIGURE_INCHES + 1 and width * fig.dpi < 2**16
    assert len(fig.axes[0].get_xticks()) < 50  # numbered, not a thousand names on top of each other
    small = confusion_figure({"confusion": torch.eye(10, dtype=torch.long).tolist(), "top1": 1.0, "n": 10},
                             [f"c{i}" for i in range(10)])
    assert [t.get_text() for t in small.axes[0].get_xticklabels()] == [f"c{i}" for i in range(10)]


def _scored(labels, predictions, k):
    from cnnlab.core.metrics import Scores

    logits = torch.zeros(len(labels), k)
    logits[torch.arange(len(labels)), predictions] = 5.0
    probabilities = logits.softmax(1)
    top1 = (predictions == labels).float().mean().item()
    return Scores(0.5, top1, predictions, labels, probabilities.amax(1), probabilities, logits)


@pytest.mark.parametrize("k", [10, 100_000])
def test_the_report_finds_the_confused_pairs_of_any_number_of_classes_without_their_square(k):
    from types import SimpleNamespace

    from cnnlab.report import sections

    labels = torch.tensor([0, 0, 5, 5, 5, k - 1, 7, 7])
    predictions = torch.tensor([1, 1, 5, 2, 2, 0, 7, 7])
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    classes = [f"c{i}" for i in range(k)]
    inspection = SimpleNamespace(test_set=lambda: (images, labels), scores=lambda: _scored(labels, predictions, k),
                                 classes=classes, run=SimpleNamespace(tta=False, temperature=None))
    notes = []
    contents = SimpleNamespace(test=None, note=lambda section, text: notes.append((section, text)))
    sections._score_test(contents, inspection)
    pairs = [(p.true, p.pred, p.count) for p in contents.test.pairs]
    # Most confused first; a tie in the order of the matrix's cells, row by row.
    assert pairs == [("c0", "c1", 2), ("c5", "c2", 2), (f"c{k - 1}", "c0", 1)]
    assert [round(p.share, 3) for p in contents.test.pairs] == [1.0, 0.667, 1.0]
    if k <= 1000:
        assert contents.test.confusion is not None and notes == []
    else:
        assert contents.test.confusion is None
        assert notes and notes[0][0] == "confusion" and "100,000 classes are too many" in notes[0][1]


def test_the_explorer_has_no_confusion_matrix_for_100000_classes():
    from types import SimpleNamespace

    from cnnlab.serve.runs import confusion

    result = {"predictions": [0, 1], "labels": [0, 0], "top1": 0.5}
    status = SimpleNamespace(result=result)
    assert confusion(status, [f"c{i}" for i in range(100_000)]) is None
    assert confusion(status, ["a", "b"])["matrix"] == [[1, 1], [0, 0]]


@pytest.mark.parametrize("preprocess", [{"size": "32"}, {"size": 32, "channels": 3, "mean": [0.5], "std": [0]}, [1]])
def test_a_weights_checkpoint_with_a_malformed_preprocessing_is_one_line(tmp_path, preprocess):
    from cnnlab.core.errors import UserError
    from cnnlab.models import weights

    path = tmp_path / "w.pt"
    torch.save({"model_spec": {"name": "resnet20"}, "model": {}, "preprocess": preprocess}, path)
    with pytest.raises(UserError, match=r"`weights` .*w\.pt: its preprocess") as err:
        weights.describe("resnet20", str(path))
    assert "\n" not in str(err.value)
