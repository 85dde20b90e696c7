"""Nothing trusted: hostile checkpoints and archives, broken images, checkpoints that do not fit."""

import io
import json
import os
import stat
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import cli
from cnnlab.core import checkpoint
from cnnlab.core.errors import UserError
from cnnlab.data import archives, load_dataset


def one_error_line(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def image_bytes(seed, fmt="PNG", size=(12, 10)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def image_tree(root, per_class=3):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                (root / split / cls / f"{i}.png").write_bytes(image_bytes(hash((split, cls, i)) % 1000))
    return root


# --- checkpoints ---------------------------------------------------------------------------------


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from cnnlab.config import resolve
    from cnnlab.train.engine import train

    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(resolve(overrides=dict(recipe="fast", dataset="sample", model="resnet18-cifar", width=4, image_size=16,
                                 epochs=1, batch_size=128, limit_train=256, limit_test=64, val_split=0,
                                 device="cpu", out=str(out))))
    return out / "checkpoints" / "last.pt"


def test_a_checkpoint_that_would_run_a_command_is_refused(tmp_path, capsys, small_checkpoint):
    marker = tmp_path / "pwned"
    state = torch.load(small_checkpoint, weights_only=True)
    state["config"] = RunsAShellCommand(marker)
    evil = tmp_path / "evil.pt"
    torch.save(state, evil)
    err = one_error_line(capsys, ["evaluate", str(evil)])
    assert "refusing to load" in err and "could run code" in err
    # The same file as a run's last.pt, picked up by --resume.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    evil.rename(tmp_path / "run" / "checkpoints" / "last.pt")
    assert "refusing to load" in one_error_line(capsys, ["train", "--resume", str(tmp_path / "run")])
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoints_get_a_clear_message(tmp_path, capsys, small_checkpoint, damage):
    data = small_checkpoint.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 50,
                     "empty": b""}[damage])
    assert "truncated or corrupt" in one_error_line(capsys, ["evaluate", str(bad)])


def test_a_checkpoint_for_another_model_or_class_count_is_explained(tmp_path, capsys, small_checkpoint):
    state = torch.load(small_checkpoint, weights_only=True)
    state["model_spec"] = {**state["model_spec"], "num_classes": 7}
    other = tmp_path / "other.pt"
    torch.save(state, other)
    err = one_error_line(capsys, ["evaluate", str(other)])
    assert "does not match model resnet18-cifar" in err and "7 classes" in err
    # Right model, but evaluated on data with other classes.
    err = one_error_line(capsys, ["evaluate", str(small_checkpoint),
                                  "--dataset", f"folder:{image_tree(tmp_path / 'd')}"])
    assert "trained on airplane, automobile" in err and "cat, dog" in err


def test_a_foreign_torch_file_is_not_a_checkpoint(tmp_path, capsys):
    foreign = tmp_path / "weights.pt"
    torch.save({"layer.weight": torch.zeros(2)}, foreign)
    assert "not a cnnlab checkpoint" in one_error_line(capsys, ["evaluate", str(foreign)])


# --- archives ------------------------------------------------------------------------------------


def zip_with(path, extra):
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            zf.writestr(f"{split}/cat/a.png", image_bytes(1))
        extra(zf)
    return path


def test_zip_symlink_pointing_outside_is_refused(tmp_path):
    def link(zf):
        info = zipfile.ZipInfo("train/cat/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../../../etc/passwd")

    archive = zip_with(tmp_path / "link.zip", link)
    with pytest.raises(UserError, match="'train/cat/link.png' -> '../../../../etc/passwd' that points outside"):
        load_dataset(f"folder:{archive}")
    assert [p.name for p in tmp_path.iterdir()] == ["link.zip"]


def test_archive_beyond_the_size_bound_is_refused_naming_the_member(tmp_path, monkeypatch):
    archive = zip_with(tmp_path / "big.zip", lambda zf: zf.writestr("train/cat/huge.png", b"\0" * 5000))
    monkeypatch.setattr(archives, "MAX_TOTAL_BYTES", 4000)
    with pytest.raises(UserError, match="unpacks to more than .*'train/cat/huge.png'"):
        load_dataset(f"folder:{archive}")


# --- broken images -------------------------------------------------------------------------------


@pytest.fixture
def broken_tree(tmp_path):
    root = image_tree(tmp_path / "data")
    jpeg = image_bytes(7, "JPEG", size=(64, 64))
    (root / "train" / "dog" / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "test" / "cat" / "zero.png").write_bytes(b"")
    return root


def test_broken_images_are_named(broken_tree):
    with pytest.raises(UserError, match="(train/dog/corrupt.jpg|test/cat/zero.png).*`skip_bad_images`"):
        load_dataset(f"folder:{broken_tree}")


def test_broken_images_are_skipped_and_counted_with_the_flag(broken_tree, tmp_path, capsys):
    data = load_dataset(f"folder:{broken_tree}", skip_bad_images=True)
    assert sorted(data.skipped) == ["test/cat/zero.png", "train/dog/corrupt.jpg"]
    assert len(data.train_y) == 6 and len(data.test_y) == 6  # 3 readable images per class and split
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1]

    out = tmp_path / "run"
    code = cli.main(["train", "--dataset", f"folder:{broken_tree}", "--skip-bad-images", "--model", "resnet18-cifar",
                     "--width", "2", "--image-size", "8", "--epochs", "1", "--batch-size", "4", "--val-split", "0",
                     "--device", "cpu", "--out", str(out)])
    assert code == 0
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().err
    info = json.loads((out / "config.json").read_text())
    assert info["config"]["skip_bad_images"] is True
    assert sorted(info["data"]["skipped_images"]) == ["test/cat/zero.png", "train/dog/corrupt.jpg"]


def test_a_class_left_empty_by_skipping_is_explained(tmp_path):
    root = image_tree(tmp_path / "data", per_class=1)
    (root / "train" / "dog" / "0.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="no readable training images are left in class dog"):
        load_dataset(f"folder:{root}", skip_bad_images=True)


def test_grayscale_data_trains_with_a_colour_recipe(tmp_path):
    # The recipes carry RGB statistics; one-channel data uses their average rather than failing.
    root = tmp_path / "gray"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((8, 8), 40 if cls == "a" else 200, np.uint8)).save(root / split / cls / "x.png")
    assert cli.main(["train", "--dataset", f"folder:{root}", "--recipe", "fast", "--width", "2", "--epochs", "1",
                     "--val-split", "0", "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["model_spec"]["in_channels"] == 1
