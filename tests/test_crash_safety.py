"""Nothing lost: kills at random moments, crashes inside a checkpoint write, a full disk, divergence, locks."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from cnnlab import cli
from cnnlab.core import checkpoint
from cnnlab.core.errors import UserError

# A tiny model and frequent checkpoints: every step is a moment at which a kill can land.
KILL_RUN = ["--recipe", "fast", "--dataset", "sample", "--model", "resnet18-cifar", "--width", "4",
            "--image-size", "16", "--epochs", "3", "--batch-size", "32", "--lr", "0.1", "--limit-train", "480",
            "--limit-test", "64", "--val-split", "32", "--device", "cpu", "--seed", "5", "--checkpoint-every", "1"]


def command(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: deterministic and kind to a 2-core machine
    return [sys.executable, "-m", "cnnlab", *args], env


def weights(run_dir):
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]


def step_losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "step"]


def last_logged_step(run_dir):
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, ValueError, KeyError):
        return 0  # not written yet, or a line being written right now


def test_kill_9_at_random_moments_then_resume_gives_the_same_weights(tmp_path):
    argv, env = command("train", *KILL_RUN, "--out", str(tmp_path / "whole"))
    subprocess.run(argv, env=env, check=True, capture_output=True)
    total = step_losses(tmp_path / "whole")[-1][0]

    # Two kills while starting up (importing, loading data, first checkpoint), then kills at random
    # moments spread over the whole run; with a checkpoint every step, some land inside a write.
    rng = random.Random(0)
    plan = [("time", rng.uniform(0.1, 2.0)) for _ in range(2)]
    plan += [("step", s) for s in sorted(rng.sample(range(1, total), 9))]
    run_dir, kills = tmp_path / "killed", 0
    for kind, when in plan:
        if (run_dir / "checkpoints" / "last.pt").exists():
            argv, env = command("train", "--resume", str(run_dir))
        else:
            argv, env = command("train", *KILL_RUN, "--out", str(run_dir))
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        if kind == "time":
            time.sleep(when)
        else:
            while last_logged_step(run_dir) < when and proc.poll() is None:
                assert time.monotonic() < deadline, "the run stopped making progress"
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 10

    argv, env = command("train", "--resume", str(run_dir))
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = weights(tmp_path / "whole"), weights(run_dir)
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    assert step_losses(run_dir) == step_losses(tmp_path / "whole")
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


def test_a_process_killed_inside_a_checkpoint_write_leaves_the_old_one(tmp_path):
    path = tmp_path / "last.pt"
    good = {"model": {"w": torch.arange(4.0)}, "model_spec": {}, "classes": ["a"], "normalize": {}}
    checkpoint.save(good, path)
    # The child writes half of a new checkpoint into the temporary file, then dies on the spot.
    script = f"""
import os, torch
from pathlib import Path
from cnnlab.core import checkpoint
def dying_save(obj, f):
    f.write(b"PK" + b"x" * 1000)
    f.flush()
    os._exit(9)
checkpoint.torch.save = dying_save
checkpoint.save({{"model": {{"w": torch.zeros(4)}}}}, Path({str(path)!r}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == 9
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.arange(4.0))


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    good = {"model": {"w": torch.arange(3.0)}, "model_spec": {}, "classes": ["a"], "normalize": {}}
    checkpoint.save(good, path)

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(UserError, match="No space left on device.*previous last.pt is intact"):
        checkpoint.save({"model": {}}, path)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = cli.main(["train", *KILL_RUN, "--out", str(blocker / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot create the run folder" in err


def test_divergence_names_the_step_and_keeps_a_loadable_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "boom"
    code = cli.main(["train", *KILL_RUN, "--lr", "1e6", "--out", str(run_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "diverged" in err[0] and "at step" in err[0] and "--lr" in err[0], err
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    bad_step = int(err[0].split("at step ")[1].split()[0])
    assert state["step"] < bad_step
    logged = step_losses(run_dir)
    assert all(step < bad_step for step, _ in logged)


def test_a_run_folder_in_use_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "busy"
    argv, env = command("train", *KILL_RUN, "--epochs", "200", "--out", str(run_dir))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "last.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        before = (run_dir / "config.json").read_text()
        assert cli.main(["train", "--resume", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert f"being trained by process {proc.pid}" in err
        assert (run_dir / "config.json").read_text() == before
    finally:
        proc.kill()
        proc.wait()
    # Once the other process is gone (killed, so its lock went with it) the run can be resumed.
    from cnnlab.train.lock import RunLock
    with RunLock(run_dir):
        pass
