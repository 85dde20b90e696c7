"""Hardening round 2 (#19): what a careful user and an attacker tried, and what must now hold.

Each block is one finding: zip bombs under the size limit, weights that turn NaN behind a finite loss,
splits that leave nothing to train on, BatchNorm on one image, malformed checkpoints, silent
corruption, SIGINT/SIGTERM, and messages that break the terminal. The next round starts from here.
Everything is tiny (8 px images, width 2) so that the module runs in well under a minute.
"""

import io
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import cli, run
from cnnlab.core import checkpoint
from cnnlab.core.errors import UserError
from cnnlab.data import archives, load_dataset

# Class names a hostile folder can have: an ANSI escape, and a newline that would forge an output line.
HOSTILE = ["a\x1b[31mred", "b\nforged line"]
STEPS = 5  # 72 training images in batches of 16: four of 16 and one of 8
SIGNAL_STEPS = 18  # the same in batches of 4, for runs that a signal stops


def png(seed, size=8, mode="RGB"):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3) if mode == "RGB" else (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def tree(root, classes=("cat", "dog"), train=40, test=5):
    for split, n in (("train", train), ("test", test)):
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                (root / split / cls / f"{i}.png").write_bytes(png(hash((split, c, i)) % 10_000))
    return root


def tiny(data, out, *extra):
    return ["train", "--recipe", "fast", "--dataset", f"folder:{data}", "--model", "resnet18-cifar", "--width", "2",
            "--image-size", "8", "--batch-size", "16", "--val-split", "8", "--lr", "0.05", "--device", "cpu",
            "--seed", "7", "--out", str(out), *extra]


def one_error_line(capsys, argv, code=2):
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny folder dataset whose class names are hostile."""
    return tree(tmp_path_factory.mktemp("hardening") / "data", HOSTILE)


@pytest.fixture(scope="module")
def stopped_run(data, tmp_path_factory):
    """Two epochs asked for, stopped after the first: last.pt and best.pt, both resumable."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert cli.main(tiny(data, out, "--epochs", "2", "--stop-after", str(STEPS))) == 0
    return out


@pytest.fixture
def a_run(stopped_run, tmp_path):
    """A copy of the stopped run to damage."""
    return shutil.copytree(stopped_run, tmp_path / "run")


# --- 1. archives: bombs under the total size limit ----------------------------------------------------


def bomb_zip(path, bomb_size, head=b""):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                zf.writestr(f"{split}/{cls}/ok.png", png(len(split) + ord(cls)))
        zf.writestr("train/a/bomb.png", head + b"\0" * (bomb_size - len(head)))
    return path


@pytest.fixture
def opened(monkeypatch):
    """The names of the zip members whose data is read."""
    names = []
    real = zipfile.ZipFile.open

    def spy(self, name, mode="r", *args, **kwargs):
        if mode == "r":
            names.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
        return real(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return names


def test_a_member_larger_than_any_image_is_refused_from_its_header(tmp_path, monkeypatch, opened):
    archive = bomb_zip(tmp_path / "bomb.zip", 8 * 2**20)
    monkeypatch.setenv("CNNLAB_MAX_IMAGE_BYTES", str(2**20))  # stands for the real bound of ~716 MB
    with pytest.raises(UserError, match=r"'train/a/bomb.png' unpacks to 8.0 MiB, more than any image cnnlab reads"):
        load_dataset(f"folder:{archive}")
    assert "train/a/bomb.png" not in opened  # refused before a byte of it was inflated


def test_the_member_bound_follows_the_memory_of_the_machine(monkeypatch):
    monkeypatch.setattr(archives, "physical_memory", lambda: 64 * 2**20)
    assert archives.member_limit() == 8 * 2**20 and archives.total_limit() == 32 * 2**20
    monkeypatch.setattr(archives, "physical_memory", lambda: 2**40)
    assert archives.member_limit() == archives.MAX_IMAGE_BYTES and archives.total_limit() == archives.MAX_TOTAL_BYTES


def test_a_member_that_compresses_like_a_bomb_is_refused_by_its_ratio(tmp_path, monkeypatch, opened):
    archive = bomb_zip(tmp_path / "bomb.zip", 16 * 2**20)
    monkeypatch.setattr(archives, "RATIO_FLOOR", 2**20)  # stands for 16 MiB
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=r"'train/a/bomb.png' unpacks from .* times smaller packed .*zip bomb"):
            load_dataset(f"folder:{archive}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "train/a/bomb.png" not in opened and peak < 4 * 2**20  # hashing the archive reads 1 MiB blocks


def test_an_image_header_with_a_bomb_behind_it_is_refused_after_the_header(tmp_path, monkeypatch):
    archive = bomb_zip(tmp_path / "bomb.zip", 4 * 2**20, head=png(1, size=4))
    monkeypatch.setattr(archives, "HEADER_SLACK", 2**20)  # stands for 64 MiB
    with pytest.raises(UserError, match=r"'train/a/bomb.png' is 4.0 MiB, but its header describes a 4×4 image"):
        load_dataset(f"folder:{archive}")


def test_a_tar_cut_at_a_member_boundary_is_refused(tmp_path):
    source = tree(tmp_path / "d", train=3, test=3)
    archive = tmp_path / "d.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname=".")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
    cut = members[-3]  # 10 of the 12 images stay
    end = cut.offset_data + -(-cut.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    archive.write_bytes(archive.read_bytes()[:end])
    with pytest.raises(UserError, match="is truncated: it ends without the end-of-archive marker"):
        load_dataset(f"folder:{archive}")


# --- 2. "last good checkpoint" holds NaN -----------------------------------------------------------


def test_weights_that_turn_nan_behind_a_finite_loss_are_never_saved(data, tmp_path, capsys, monkeypatch):
    # Step 2's update leaves an infinite weight while its loss (computed before it) was finite.
    real, calls = torch.optim.SGD.step, []

    def poisoned(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", poisoned)
    out = tmp_path / "run"
    err = one_error_line(capsys, tiny(data, out, "--epochs", "1", "--checkpoint-every", "1"))
    assert "diverged: the weights became NaN or infinite at step 2" in err and "last good checkpoint (step 1)" in err
    last = checkpoint.read(out / "checkpoints" / "last.pt")  # read() refuses non-finite weights
    assert last.step == 1
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "step"]
    assert steps == [1]


def test_the_issue_run_at_lr_1e6_leaves_a_finite_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "boom"
    err = one_error_line(capsys, ["train", "--dataset", "sample", "--model", "resnet18-cifar", "--width", "4",
                                  "--image-size", "32", "--epochs", "2", "--batch-size", "64", "--device", "cpu",
                                  "--limit-train", "640", "--lr", "1e6", "--checkpoint-every", "3", "--out", str(out)])
    assert "diverged" in err
    bad = int(err.split("at step ")[1].split()[0])
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    saved = checkpoint.read(out / "checkpoints" / "last.pt")
    assert saved.step < bad and int(err.split("last good checkpoint (step ")[1].split(")")[0]) == saved.step


def test_predict_and_evaluate_refuse_non_finite_weights(stopped_run, tmp_path, capsys):
    ckpt = checkpoint.read(stopped_run / "checkpoints" / "last.pt")
    name = next(iter(ckpt.model))
    ckpt.model[name] = torch.full_like(ckpt.model[name], float("nan"))
    bad = tmp_path / "nan.pt"
    checkpoint.write(ckpt, bad)  # a valid checksum: only the values are wrong
    image = tmp_path / "x.png"
    image.write_bytes(png(3))
    for argv in (["predict", str(bad), str(image)], ["evaluate", str(bad)]):
        assert f"non-finite weights (NaN or infinity in model {name})" in one_error_line(capsys, argv)


# --- 3 and 4. splits that leave nothing to train on, BatchNorm on one image --------------------------


def test_a_val_split_that_leaves_less_than_a_batch_is_refused(data, tmp_path, capsys):
    argv = tiny(data, tmp_path / "run", "--epochs", "1")
    argv[argv.index("--val-split") + 1] = "100000"
    err = one_error_line(capsys, argv)
    assert "--val-split 100000 would leave 0 of the 80 training images" in err and "one batch" in err
    argv[argv.index("--val-split") + 1] = "70"
    assert "hold out at most 64" in one_error_line(capsys, argv)
    assert not (tmp_path / "run").exists()


def test_batch_size_1_is_refused_with_batchnorm(tmp_path, capsys):
    err = one_error_line(capsys, ["train", "--dataset", "sample", "--model", "resnet18", "--width", "4",
                                  "--image-size", "32", "--epochs", "1", "--batch-size", "1", "--limit-train", "64",
                                  "--device", "cpu", "--out", str(tmp_path / "run")])
    assert "--batch-size must be at least 2" in err and "BatchNorm" in err
    assert not (tmp_path / "run").exists()


def test_batch_size_1_trains_a_model_without_batchnorm(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", f"folder:{data}", "--model", "alexnet-cifar", "--width", "4",
                     "--image-size", "32", "--epochs", "1", "--batch-size", "1", "--limit-train", "3",
                     "--val-split", "0", "--device", "cpu", "--out", str(out)]) == 0
    assert "joins the batch before it" not in capsys.readouterr().err
    assert checkpoint.read(out / "checkpoints" / "last.pt").step == 3


def test_a_checkpoint_of_a_torchvision_model_loads(tmp_path):
    from cnnlab.core.spec import ModelSpec, Preprocess
    from cnnlab.models import build

    spec = ModelSpec("torchvision:squeezenet1_1", 2, None, 3)
    model = build(spec.name, num_classes=2, width=None, in_channels=3)
    checkpoint.write(checkpoint.Checkpoint(model.state_dict(), spec, Preprocess(32, 3), ["a", "b"]), tmp_path / "tv.pt")
    assert run.load(tmp_path / "tv.pt").spec == spec


def test_a_last_batch_of_one_image_joins_the_one_before(data, tmp_path, capsys):
    # 80 training images, none held out, batches of 79: the second batch would be one image, at 1×1
    # in conv5_x, where BatchNorm raises.
    argv = tiny(data, tmp_path / "run", "--epochs", "1", "--batch-size", "79")
    argv[argv.index("--val-split") + 1] = "0"
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("joins the batch before it") == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == [1]


# --- 5. malformed but safe checkpoints -------------------------------------------------------------


def edited(state, change):
    state = {k: v for k, v in state.items() if k != "checksum"}  # as if written before checksums
    change(state)
    return state


MALFORMED = {
    "no model name": (lambda s: s["model_spec"].pop("name"), "model_spec.name is None"),
    "std 0": (lambda s: s["preprocess"].update(std=[0.0, 0.0, 0.0]), "a standard deviation must be above 0"),
    "too few classes": (lambda s: s.update(classes=["x"]), "but 1 class names"),
    "model a list": (lambda s: s.update(model=list(s["model"].values())), "model is list, not a table"),
    "width 10^6": (lambda s: s["model_spec"].update(width=10**6), "model_spec.width is 1000000, outside 1…256"),
    "image size 10^6": (lambda s: s["preprocess"].update(size=10**6), "preprocess.size is 1000000"),
    "unknown model": (lambda s: s["model_spec"].update(name="vgg19"),
                      "for model 'vgg19', which this cnnlab cannot build"),
    "config a string": (lambda s: s.update(config="x"), "config is str, not a table"),
    "bad config value": (lambda s: s["config"].update(limit_test=-5), "invalid training configuration: --limit-test"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_checkpoints_are_one_line(stopped_run, tmp_path, capsys, case):
    change, message = MALFORMED[case]
    state = edited(checkpoint.load(stopped_run / "checkpoints" / "last.pt"), change)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    image = tmp_path / "x.png"
    image.write_bytes(png(4))
    assert message in one_error_line(capsys, ["predict", str(bad), str(image)])


def test_files_that_are_not_torch_checkpoints_are_refused_with_the_reason(tmp_path, capsys):
    text = tmp_path / "x.pt"
    text.write_text("hello, I am not a checkpoint\n")
    assert "truncated or corrupt (it is not a file written by torch.save)" in one_error_line(
        capsys, ["evaluate", str(text)])
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"model": {"w": [1.0]}}, protocol=4))
    err = one_error_line(capsys, ["evaluate", str(plain)])
    assert "bare Python pickle" in err and "could run code" in err


def test_a_resume_of_a_damaged_training_state_is_one_line(a_run, capsys):
    path = a_run / "checkpoints" / "last.pt"
    torch.save(edited(checkpoint.load(path), lambda s: s.update(step=-3)), path)
    assert "step is -3, not a whole number ≥ 0" in one_error_line(capsys, ["train", "--resume", str(a_run)])


# --- 6. corruption that trained on -----------------------------------------------------------------


def test_a_flipped_bit_in_the_weights_is_found(a_run, capsys):
    path = a_run / "checkpoints" / "last.pt"
    raw = bytearray(path.read_bytes())
    weight = checkpoint.load(path)["model"]["conv1.0.weight"]
    at = raw.find(weight.numpy().tobytes())
    assert at > 0
    raw[at + 3] ^= 0x40  # the top exponent bit of the first float: ~1e38
    path.write_bytes(bytes(raw))
    assert torch.load(path, weights_only=True)["model"]["conv1.0.weight"].abs().max() > 1e30  # torch reads it happily
    for argv in (["train", "--resume", str(a_run)], ["evaluate", str(path)]):
        assert "is corrupt: its tensors do not match the checksum" in one_error_line(capsys, argv)


def test_resume_refuses_data_that_changed_under_the_same_class_names(tmp_path, capsys):
    data = tree(tmp_path / "data", train=10, test=2)
    out = tmp_path / "run"
    argv = tiny(data, out, "--epochs", "2", "--stop-after", "1")
    argv[argv.index("--val-split") + 1] = "0"
    assert cli.main(argv) == 0
    (data / "train" / "cat" / "3.png").write_bytes(png(99_999))
    err = one_error_line(capsys, ["train", "--resume", str(out)])
    assert "is not the one" in err and "content hash differs" in err
    info = json.loads((out / "config.json").read_text())
    assert len(info["data"]["hash"]) == 64


# --- 7. stops ----------------------------------------------------------------------------------------


def command(*args):
    return [sys.executable, "-m", "cnnlab", *args], {**os.environ, "OMP_NUM_THREADS": "1"}


def logged(run_dir, kind):
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == kind]
    except (FileNotFoundError, ValueError):
        return []


def signal_run(data, run_dir, epochs):
    return tiny(data, run_dir, "--epochs", str(epochs), "--batch-size", "4")


def stop_with(sig, data, run_dir, epochs):
    argv, env = command(*signal_run(data, run_dir, epochs))
    # A shell's background job inherits SIGINT ignored; a user's terminal does not.
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not logged(run_dir, "epoch"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.005)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1].strip().splitlines()
    return proc.returncode, err


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_the_resume_command(data, tmp_path, sig, code):
    run_dir, epochs = tmp_path / "run", 3
    returncode, err = stop_with(sig, data, run_dir, epochs)
    assert returncode == code, err
    assert err[-1].startswith(f"cnnlab train: stopped by {sig.name} at step ") and \
        err[-1].endswith(f"with a checkpoint; continue with: cnnlab train --resume {run_dir}"), err
    step = checkpoint.read(run_dir / "checkpoints" / "last.pt").step
    assert SIGNAL_STEPS <= step < epochs * SIGNAL_STEPS and logged(run_dir, "step")[-1]["step"] == step
    if sig == signal.SIGTERM:  # resumed, it ends exactly as a run that never stopped
        whole = tmp_path / "whole"
        for args in (signal_run(data, whole, epochs), ["train", "--resume", str(run_dir)]):
            argv, env = command(*args)
            done = subprocess.run(argv, env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        a = checkpoint.load(whole / "checkpoints" / "last.pt")["model"]
        b = checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert [r["loss"] for r in logged(run_dir, "step")] == [r["loss"] for r in logged(whole, "step")]


def test_with_last_pt_lost_both_commands_offer_best_pt(a_run, data, capsys):
    best = a_run / "checkpoints" / "best.pt"
    (a_run / "checkpoints" / "last.pt").unlink()
    assert f"with: cnnlab train --resume {best}" in one_error_line(capsys, ["train", "--resume", str(a_run)])
    assert f"--resume {best}" in one_error_line(capsys, tiny(data, a_run, "--epochs", "2"))
    assert cli.main(["train", "--resume", str(best)]) == 0
    assert checkpoint.read(a_run / "checkpoints" / "last.pt").step == 2 * STEPS


# --- 8. messages -------------------------------------------------------------------------------------


def test_a_file_size_limit_while_saving_is_one_line(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.arange(3.0)}}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2**10, hard))  # Python ignores SIGXFSZ: writes fail instead
    try:
        with pytest.raises(UserError, match="cannot write checkpoint .*(File too large|could not be written in full)"
                                            ".*previous last.pt is intact"):
            checkpoint.save({"model": {"w": torch.zeros(2**18)}}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_class_names_are_escaped_in_evaluate_and_predict(stopped_run, data, capsys, recwarn):
    image = data / "test" / HOSTILE[1] / "0.png"
    for argv in (["evaluate", str(stopped_run)], ["predict", str(stopped_run), str(image)]):
        assert cli.main(argv) == 0
        # Escaped in the confusion matrix's labels too: a font has no glyph for a control character.
        assert not [w for w in recwarn if "Glyph" in str(w.message)]
        out = capsys.readouterr().out
        assert "\x1b" not in out and "forged line" not in [line.strip() for line in out.splitlines()]
        assert "a\\x1b[31mred" in out and "b\\nforged line" in out


def test_a_symlinked_class_folder_is_followed(tmp_path):
    data = tree(tmp_path / "d", train=2, test=1)
    shutil.move(data / "train" / "dog", tmp_path / "dogs")
    (data / "train" / "dog").symlink_to(tmp_path / "dogs", target_is_directory=True)
    assert load_dataset(f"folder:{data}").train_y.tolist() == [0, 0, 1, 1]
    (data / "train" / "cat" / "loop").symlink_to(data / "train", target_is_directory=True)
    with pytest.raises(UserError, match="is a link to a folder that contains it"):
        load_dataset(f"folder:{data}")


def test_the_loaded_run_checks_pass_for_a_good_checkpoint(stopped_run):
    loaded = run.load(stopped_run)
    assert loaded.classes == HOSTILE and loaded.checkpoint.data["hash"]
