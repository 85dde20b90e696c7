"""Experiment tracking with MLflow (--mlflow), read back through MLflow's own client.

One module fixture trains everything once (MLflow's import and its SQLite store's set-up take seconds):
a run killed between an epoch's checkpoint and its MLflow log, then resumed; and a group of two seeds
stopped in its second seed, then resumed, then reported.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnlab import cli
from cnnlab.config import from_saved, resolve
from cnnlab.core.checkpoint import load as load_checkpoint
from cnnlab.core.errors import Interrupted, UserError
from cnnlab.report import report
from cnnlab.train import tracking
from cnnlab.train.logging import read_metrics
from cnnlab.train.seeds import summary, train_group

mlflow_client = pytest.importorskip("mlflow.tracking", reason="the test extra installs cnnlab[mlflow]")

# Two epochs of 2 steps each (128 training images).
SMALL = dict(recipe="fast", dataset="sample", model="resnet18-cifar", width=4, image_size=32, epochs=2,
             batch_size=64, lr=0.1, limit_train=192, limit_test=64, val_split=64, device="cpu")
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
STEPS = 4


def client_of(folder):
    record = tracking.read_record(folder)
    return mlflow_client.MlflowClient(tracking.Tracker(folder, record).uri), record


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    run, group = root / "run", root / "group"
    states = {}
    logged = tracking.Tracker.epoch

    def killed_after_first_checkpoint(self, record):
        if record["epoch"] == 1:
            raise Interrupted(signal.SIGTERM, "killed after the checkpoint of epoch 1, before MLflow heard of it")
        logged(self, record)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracking.Tracker, "epoch", killed_after_first_checkpoint)
        assert cli.main(["train", *FLAGS, "--mlflow", "--out", str(run)]) == 143
    client, record = client_of(run)
    states["run"] = (record.run_id, client.get_run(record.run_id).info.status,
                     client.get_metric_history(record.run_id, "train_loss"))
    assert cli.main(["train", "--resume", str(run)]) == 0

    stopped = train_group(resolve(overrides={**SMALL, "out": str(group), "mlflow": True}), [0, 1],
                          stop_after=STEPS + 1)
    assert not stopped.finished
    client, record = client_of(group / "seed-1")
    states["seed-1"] = (record.run_id, client.get_run(record.run_id).info.status)
    client, record = client_of(group)
    states["group"] = (record.run_id, client.get_run(record.run_id).info.status)
    assert cli.main(["train", "--resume", str(group)]) == 0
    report(group)
    return run, group, states


def configuration(run_dir):
    """The run's TrainConfig as a dict (what was logged: config.json spells tuples as lists)."""
    return from_saved(json.loads((run_dir / "config.json").read_text())["config"]).to_dict()


def epoch_records(run_dir):
    return read_metrics(run_dir)[1]


def assert_logged_as_metrics_jsonl(run_dir):
    """Every figure of every epoch record, once per epoch, at step = epoch, with the same value."""
    client, record = client_of(run_dir)
    epochs = epoch_records(run_dir)
    keys = {k for r in epochs for k in r} - {"kind", "epoch"}
    assert keys >= {"train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "step"}
    assert set(client.get_run(record.run_id).data.metrics) == keys
    for key in keys:
        history = sorted((m.step, m.value) for m in client.get_metric_history(record.run_id, key))
        assert history == [(r["epoch"], float(r[key])) for r in epochs], key


def test_parameters_equal_the_configuration(tracked):
    run, group, _ = tracked
    for run_dir in (run, group / "seed-0", group / "seed-1"):
        client, record = client_of(run_dir)
        config = configuration(run_dir)
        assert client.get_run(record.run_id).data.params == {k: str(v) for k, v in config.items()}
        assert config["mlflow"] is True and config["width"] == 4 and config["mean"] == (0.4914, 0.4822, 0.4465)


def test_metric_histories_equal_metrics_jsonl_at_each_epoch(tracked):
    run, group, _ = tracked
    for run_dir in (run, group / "seed-0", group / "seed-1"):
        assert [r["epoch"] for r in epoch_records(run_dir)] == [1, 2]
        assert_logged_as_metrics_jsonl(run_dir)


def test_the_checkpoints_are_artifacts_that_load(tracked, tmp_path):
    run, _, _ = tracked
    client, record = client_of(run)
    assert sorted(f.path for f in client.list_artifacts(record.run_id, "checkpoints")) == \
        ["checkpoints/best.pt", "checkpoints/last.pt"]
    for name in ("last.pt", "best.pt"):
        copy = Path(client.download_artifacts(record.run_id, f"checkpoints/{name}", str(tmp_path)))
        logged, saved = load_checkpoint(copy), load_checkpoint(run / "checkpoints" / name)
        assert logged["model"].keys() == saved["model"].keys()
        assert all(torch.equal(logged["model"][k], saved["model"][k]) for k in saved["model"])
        assert (logged["step"], logged["checksum"]) == (saved["step"], saved["checksum"])
    assert load_checkpoint(copy.parent / "last.pt")["step"] == STEPS  # the end of the run


def test_resume_continues_the_same_mlflow_run(tracked):
    run, group, states = tracked
    run_id, status, history = states["run"]
    assert status == "KILLED" and history == []  # killed before epoch 1 was logged
    client, record = client_of(run)
    assert record.run_id == run_id and record.store == "mlflow" and record.tracking_uri is None
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["cnnlab.stopped"] == "finished"
    assert [r.info.run_id for r in client.search_runs([record.experiment_id])] == [run_id]  # one run, continued
    seed_id, seed_status = states["seed-1"]
    assert seed_status == "KILLED"  # stopped one step into its first epoch, to be resumed
    assert tracking.read_record(group / "seed-1").run_id == seed_id
    assert client_of(group / "seed-1")[0].get_run(seed_id).info.status == "FINISHED"


def test_a_group_is_a_parent_run_with_a_nested_run_per_seed(tracked):
    _, group, states = tracked
    client, record = client_of(group)
    assert states["group"] == (record.run_id, "KILLED") and record.store == "mlflow"
    parent = client.get_run(record.run_id)
    assert parent.info.status == "FINISHED"
    shared = {k: str(v) for k, v in configuration(group / "seed-0").items() if k not in ("seed", "out")}
    assert parent.data.params == {**shared, "seeds": "0 1"}
    spread = summary(group)["summary"]
    assert parent.data.metrics["test_acc_mean"] == pytest.approx(spread["test_acc"]["mean"], rel=1e-12)
    assert parent.data.metrics["test_acc_std"] == pytest.approx(spread["test_acc"]["std"], rel=1e-12)
    for s in (0, 1):
        seed = tracking.read_record(group / f"seed-{s}")
        assert (seed.store, seed.parent_run_id) == ("../mlflow", record.run_id)
        assert client.get_run(seed.run_id).data.tags["mlflow.parentRunId"] == record.run_id
    assert [f.path for f in client.list_artifacts(record.run_id)] == ["report.html"]
    logged = client.download_artifacts(record.run_id, "report.html")
    assert open(logged).read() == (group / "report.html").read_text()


def test_the_command_says_where_to_see_it(tracked):
    run, _, _ = tracked
    assert tracking.describe(run) == f"mlflow ui --backend-store-uri sqlite:///{run / 'mlflow' / 'mlflow.db'}"
    assert tracking.describe(run / "checkpoints") is None


def test_a_missing_mlflow_is_one_line_saying_how_to_install_it(tmp_path, capsys, monkeypatch):
    for name in [n for n in sys.modules if n == "mlflow" or n.startswith("mlflow.")] + ["mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)  # what `import mlflow` finds when it is not installed
    out = tmp_path / "run"
    assert cli.main(["train", *FLAGS, "--mlflow", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("cnnlab train: error: --mlflow logs to MLflow, which is not installed; install it with: "
                   "pip install 'cnnlab[mlflow]'")
    assert not out.exists()  # said before anything was written


def test_the_flag_and_the_toml_key(tmp_path):
    parse = cli.build_parser().parse_args
    given = {k: v for k, v in vars(parse(["train", "--mlflow"])).items() if k != "command"}
    assert given == {"mlflow": True}
    assert parse(["train", "--mlflow", "http://127.0.0.1:5000"]).mlflow == "http://127.0.0.1:5000"
    assert parse(["train", "--no-mlflow"]).mlflow is False
    assert resolve(overrides={**SMALL}).mlflow is False  # TensorBoard alone unless asked
    toml = tmp_path / "c.toml"
    toml.write_text('mlflow = "sqlite:///runs.db"\n')
    assert resolve(toml_path=toml).mlflow == "sqlite:///runs.db"
    for bad, words in (("", "`mlflow` must be a tracking URI"), (3, "`mlflow` must be true, false or text")):
        with pytest.raises(UserError, match=words):
            resolve(overrides={**SMALL, "mlflow": bad})


def test_mlflow_is_not_imported_without_the_flag(tmp_path):
    """Nothing imports MLflow at its top, and a folder that logs to no MLflow run makes no call to it."""
    code = ("import sys; from pathlib import Path; import cnnlab.cli, cnnlab.report, cnnlab.train.engine; "
            "from cnnlab.train import tracking; "
            f"tracking.log_report(Path({str(tmp_path)!r}), Path('report.html')); "
            f"print(tracking.describe(Path({str(tmp_path)!r})), 'mlflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["None", "False"]


def test_under_torchrun_rank_0_alone_logs(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CNNLAB_DIST_TIMEOUT": "60"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "cnnlab", "train", *FLAGS, "--mlflow", "--out", str(run)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    client, record = client_of(run)
    assert [r.info.run_id for r in client.search_runs([record.experiment_id])] == [record.run_id]
    assert client.get_run(record.run_id).info.status == "FINISHED"
    assert_logged_as_metrics_jsonl(run)  # each epoch once: the other rank logged nothing
