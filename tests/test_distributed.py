"""torchrun on CPUs (gloo, 2 processes on 127.0.0.1): the same numbers as one process, resumable either way."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnnlab.core import checkpoint
from cnnlab.evaluate import evaluate

# No augmentation: then 2 ranks × 32 and 1 process × 64 see the very same global batches. A small,
# constant learning rate: float rounding differs between one batch of 64 and two of 32 (in the
# convolutions too), and at larger rates training amplifies that ~4× a step, so that after 20
# steps no two float32 runs agree to 1e-4, even one process with 1 and with 2 threads: a BatchNorm
# channel of a tiny model with almost no variance multiplies such differences by up to 1/sqrt(eps).
# So: one epoch of 10 steps. With a weight average and flip TTA, whose states must survive ranks too.
RUN = ["--recipe", "fast", "--dataset", "sample", "--model", "resnet18-cifar", "--width", "4", "--image-size", "16",
       "--epochs", "1", "--batch-size", "64", "--lr", "0.002", "--schedule", "constant", "--label-smoothing", "0",
       "--augment", "none", "--limit-train", "704",
       "--limit-test", "101", "--val-split", "64", "--device", "cpu", "--seed", "1", "--sync-bn",
       "--ema", "0.9", "--tta"]
STEPS = 10  # 640 training images in global batches of 64

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CNNLAB_DIST_TIMEOUT": "60"}


def one(*args, check=True):
    return subprocess.run([sys.executable, "-m", "cnnlab", "train", *args], env=ENV, capture_output=True,
                          text=True, check=check, timeout=300)


def two(*args, check=True):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "cnnlab", "train", *args], env=ENV, capture_output=True, text=True, check=check,
                          timeout=300)


def weights(run_dir: Path, key: str = "model") -> dict:
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")[key]


def assert_close(a: dict, b: dict, tol: float = 1e-4) -> None:
    for name, tensor in a.items():
        if tensor.is_floating_point():
            assert torch.allclose(tensor, b[name], atol=tol, rtol=0), (name, (tensor - b[name]).abs().max())
        else:
            assert torch.equal(tensor, b[name]), name


def epochs(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    one(*RUN, "--out", str(out))
    return out


@pytest.fixture(scope="module")
def double(tmp_path_factory):
    out = tmp_path_factory.mktemp("double") / "run"
    proc = two(*RUN, "--out", str(out), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_ranks_with_sync_bn_equal_one_process_with_the_global_batch(single, double):
    assert_close(weights(single), weights(double))
    assert_close(weights(single, "train_model"), weights(double, "train_model"))
    info = json.loads((double / "config.json").read_text())
    assert (info["world_size"], info["global_batch"], info["per_rank_batch"]) == (2, 64, 32)
    a, b = epochs(single), epochs(double)
    assert [e["step"] for e in b] == [STEPS]
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-4)
        assert x["test_acc"] == pytest.approx(y["test_acc"], abs=0.011)  # one image of 101 may flip


def test_test_accuracy_of_two_ranks_is_exact_over_the_whole_test_set(double):
    # 101 test images do not split evenly over 2 ranks: each image must still count once.
    final = epochs(double)[-1]
    scores = evaluate(double / "checkpoints" / "last.pt", device="cpu", out=double / "eval-last")
    assert scores["n"] == 101
    assert final["test_acc"] == pytest.approx(scores["top1"], abs=1e-12)
    assert final["test_loss"] == pytest.approx(scores["loss"], rel=1e-5)


def test_a_two_rank_checkpoint_resumes_in_one_process_and_back(single, tmp_path):
    # 2 ranks → stop at step 3 → 1 process → stop at step 7 → 2 ranks to the end.
    out = tmp_path / "mixed"
    assert two(*RUN, "--out", str(out), "--stop-after", "3", check=False).returncode == 0
    assert checkpoint.load(out / "checkpoints" / "last.pt")["step"] == 3
    one("--resume", str(out), "--stop-after", "4")
    assert checkpoint.load(out / "checkpoints" / "last.pt")["step"] == 7
    proc = two("--resume", str(out), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(weights(single), weights(out))
    assert [e["epoch"] for e in epochs(out)] == [1]


def test_two_ranks_merge_a_last_single_image_as_one_process_does(tmp_path):
    # 129 training images: a batch of 64, then one of 65 (the last image joins it, for BatchNorm), split
    # 33 + 32 over 2 ranks that read theirs from the cache, as one process holding them in memory sees it.
    # Two steps at a larger rate: rounding stays near 1e-6, while leaving the image out moves weights by 3e-2.
    changed = {"--limit-train": "193", "--lr": "0.2"}
    odd = [changed.get(flag, arg) for flag, arg in zip(["", *RUN], RUN)]
    single = one(*odd, "--out", str(tmp_path / "single"))
    double = two(*odd, "--no-data-on-device", "--out", str(tmp_path / "double"), check=False)
    assert double.returncode == 0, double.stderr[-3000:]
    for proc in (single, double):
        assert "joins the batch before it" in proc.stderr and "left out" not in proc.stderr
    a, b = epochs(tmp_path / "single"), epochs(tmp_path / "double")
    assert [e["step"] for e in a] == [e["step"] for e in b] == [2]
    assert a[0]["train_loss"] == pytest.approx(b[0]["train_loss"], abs=1e-4)
    assert_close(weights(tmp_path / "single"), weights(tmp_path / "double"))
    assert_close(weights(tmp_path / "single", "train_model"), weights(tmp_path / "double", "train_model"))


def test_killing_one_rank_ends_the_whole_job(tmp_path):
    out = tmp_path / "doomed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "cnnlab",
           "train", *RUN, "--epochs", "500", "--out", str(out)]
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert job.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        victim = next(pid for pid in _descendants(job.pid) if _environ(pid).get("RANK") == "1")
        os.kill(victim, signal.SIGKILL)
        _, err = job.communicate(timeout=90)  # bounded: the job must not hang on the dead rank
        assert job.returncode != 0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    # What rank 0 finished is still there.
    assert checkpoint.load(out / "checkpoints" / "last.pt")["step"] >= 0


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children += [int(c) for c in text]
    return children + [d for c in children for d in _descendants(c)]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_a_group_of_seeds_under_torchrun_trains_each_seed_as_a_distributed_run(tmp_path):
    # Each seed's run joins the process group and leaves it again; the next one joins afresh.
    at = RUN.index("--seed")
    small = RUN[:at] + RUN[at + 2:]
    small[small.index("--limit-train") + 1] = "192"  # 128 after the validation split: two global batches
    group = tmp_path / "group"
    proc = two(*small, "--seeds", "1", "2", "--out", str(group), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((group / "group.json").read_text())
    assert sorted(status["seeds"]) == [1, 2]
    for seed in (1, 2):
        run_dir = group / f"seed-{seed}"
        info = json.loads((run_dir / "config.json").read_text())
        assert info["world_size"] == 2 and info["config"]["seed"] == seed
        assert [r["epoch"] for r in epochs(run_dir)] == [1] and epochs(run_dir)[0]["step"] == 2
