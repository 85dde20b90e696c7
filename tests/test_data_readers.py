"""The readers of data/readers: which one a spec gets, and what each refuses before reading (#25).

Devices and FIFOs among a dataset's files, folder links that loop or relabel, a tampered probe
summary in the cache, CSV rows that name what is not an image file. A read that blocks or never
ends is what these guard against, so each such load runs with a deadline.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import cli
from cnnlab.core.errors import UserError
from cnnlab.data import load_dataset
from cnnlab.data.readers import create_reader
from cnnlab.data.readers.archive import ArchiveReader
from cnnlab.data.readers.csv_list import CsvReader
from cnnlab.data.readers.folder import FolderReader
from cnnlab.data.readers.hf import HfReader
from cnnlab.data.readers.named import NamedReader
from cnnlab.data.readers.probe import read_summary

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 60  # seconds: a load of a few tiny images takes well under one; a blocked one never ends


def within(seconds: float, load: Callable[[], Any]) -> Any:
    """``load()``'s result (or its exception), failing the test if it is still running after ``seconds``."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = load()
        except BaseException as e:  # handed to the test's thread
            box["error"] = e

    worker = threading.Thread(target=work, daemon=True)  # one that blocks for good dies with the tests
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still reading after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def image_tree(root: Path, per_class: int = 2, size: tuple[int, int] = (8, 6), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(11)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def entries(cache: Path) -> list[str]:
    folder = cache / "datasets"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.exists() else []


# --- the factory -----------------------------------------------------------------------------------


def test_each_spec_gets_the_reader_of_its_source(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "tree")
    (tmp_path / "list.csv").write_text("path,label,split\ntree/train/cat/0.png,cat,train\n")
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / "train.csv").write_text("path,label\n")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    (tmp_path / "a.tar.gz").write_bytes(b"")
    expected = {"cifar10": NamedReader, "sample": ArchiveReader, f"folder:{root}": FolderReader,
                f"folder:{tmp_path / 'a.tar.gz'}": ArchiveReader, f"folder:{tmp_path / 'list.csv'}": CsvReader,
                f"folder:{tmp_path / 'pair'}": CsvReader, f"folder:{tmp_path / 'hf'}": HfReader}
    for spec, kind in expected.items():
        assert type(create_reader(spec, data_dir=tmp_path)) is kind, spec
    with pytest.raises(UserError, match="unknown dataset 'folders:x'"):
        create_reader("folders:x")


# --- 8. devices and FIFOs are refused by name before they are read ----------------------------------


def test_a_link_to_dev_zero_in_a_class_folder_is_refused_by_name(tmp_path: Path, cache: Path) -> None:
    root = image_tree(tmp_path / "data")
    (root / "train" / "cat" / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(UserError, match=r"train/cat/zero\.png \(a link to /dev/zero\) is a device") as err:
        within(DEADLINE, lambda: load_dataset(f"folder:{root}"))
    assert "\n" not in str(err.value) and entries(cache) == []


def test_a_fifo_in_a_class_folder_is_refused_by_name(tmp_path: Path, cache: Path) -> None:
    root = image_tree(tmp_path / "data")
    os.mkfifo(root / "test" / "dog" / "pipe.jpg")
    with pytest.raises(UserError, match=r"test/dog/pipe\.jpg is a FIFO"):
        within(DEADLINE, lambda: load_dataset(f"folder:{root}"))
    assert entries(cache) == []


def test_a_fifo_named_by_a_csv_row_is_refused_naming_the_row(tmp_path: Path, cache: Path) -> None:
    image_tree(tmp_path / "data")
    os.mkfifo(tmp_path / "data" / "pipe.png")
    (tmp_path / "data" / "list.csv").write_text("path,label,split\ntrain/cat/0.png,cat,train\n"
                                                "pipe.png,dog,train\ntest/cat/0.png,cat,test\n")
    with pytest.raises(UserError, match=r"pipe\.png \(line 3 of .*list\.csv\) is a FIFO"):
        within(DEADLINE, lambda: load_dataset(f"folder:{tmp_path / 'data' / 'list.csv'}"))


def test_a_fifo_as_the_folder_path_or_a_csv_list_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "images.tar.gz")
    with pytest.raises(UserError, match=r"images\.tar\.gz is a FIFO.*check the folder:PATH"):
        within(DEADLINE, lambda: load_dataset(f"folder:{tmp_path / 'images.tar.gz'}"))
    image_tree(tmp_path / "data")
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / "train.csv").write_text("path,label\n../data/train/cat/0.png,cat\n")
    os.mkfifo(tmp_path / "pair" / "test.csv")
    with pytest.raises(UserError, match=r"test\.csv is a FIFO"):
        within(DEADLINE, lambda: load_dataset(f"folder:{tmp_path / 'pair'}"))


def test_the_command_line_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data")
    (root / "train" / "dog" / "zero.png").symlink_to("/dev/zero")
    env = {**os.environ, "CNNLAB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--dataset", f"folder:{root}", "--device", "cpu",
                           "--epochs", "1", "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=4 * DEADLINE)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "train/dog/zero.png (a link to /dev/zero) is a device, not a regular file" in err


# --- 9. folder links that would read a folder again ------------------------------------------------


def test_links_between_sibling_class_folders_are_refused_naming_the_link(tmp_path: Path, cache: Path) -> None:
    root = image_tree(tmp_path / "data", per_class=4)
    (root / "train" / "cat" / "x").symlink_to("../dog", target_is_directory=True)
    (root / "train" / "dog" / "y").symlink_to("../cat", target_is_directory=True)
    with pytest.raises(UserError, match=r"train/cat/x is a link to .*/train/dog, a folder inside the dataset") as err:
        within(DEADLINE, lambda: load_dataset(f"folder:{root}"))
    assert "\n" not in str(err.value)
    assert entries(cache) == []  # no dataset was made, with dogs labelled cat or otherwise


def test_a_loop_of_links_outside_the_dataset_is_refused_and_shared_folders_outside_are_read(
        tmp_path: Path, cache: Path) -> None:
    root = image_tree(tmp_path / "data")
    outside = image_tree(tmp_path / "outside")
    for split in ("train", "test"):  # both splits read one folder outside: allowed, nothing loops
        (root / split / "bird").symlink_to(outside / "train" / "cat", target_is_directory=True)
    data = within(DEADLINE, lambda: load_dataset(f"folder:{root}"))
    assert data.classes == ["bird", "cat", "dog"] and data.train_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(data.train_x[:2], data.test_x[:2])

    (outside / "train" / "cat" / "a").symlink_to(outside / "test", target_is_directory=True)
    (outside / "test" / "b").symlink_to(outside / "train" / "cat", target_is_directory=True)
    with pytest.raises(UserError, match=r"bird/a/b is a link to a folder that contains it"):
        within(DEADLINE, lambda: load_dataset(f"folder:{root}"))


# --- 10. the probe summary in the cache is checked, not trusted -------------------------------------


def tamper(path: Path, **values: Any) -> None:
    """Change the summary's values in ``path``, wherever the file keeps them, and nothing else."""
    saved = json.loads(path.read_text())
    summary = saved.get("summary", saved) if isinstance(saved, dict) else saved
    summary.update(values)
    path.write_text(json.dumps(saved))


@pytest.mark.parametrize("values", [
    {"channels": 3},  # a gray dataset read as colour: wrong, and silent
    {"channels": 2},  # every image "cannot be decoded"
    {"uniform": [0, 0]},  # a division by zero
    {"uniform": None, "median_short": "ten"},  # text for a number
    {"uniform": [8, 6, 1], "median_short": -4},
], ids=["colour", "two-channels", "zero-size", "text", "three-sides"])
def test_a_tampered_probe_summary_is_read_again(tmp_path: Path, cache: Path, caplog, values) -> None:
    root = image_tree(tmp_path / "gray", per_class=3, size=(8, 6), mode="L")
    first = load_dataset(f"folder:{root}")
    assert first.train_x.shape == (6, 1, 6, 8)
    (probe,) = (cache / "datasets").glob("*.probe.json")
    kept = read_summary(probe)
    assert kept == {"channels": 1, "uniform": [8, 6], "median_short": 6}

    tamper(probe, **values)
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        again = load_dataset(f"folder:{root}")
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, field), getattr(first, field)), field
    assert [r.getMessage() for r in caplog.records if "probe.json" in r.getMessage()] == [
        f"the cached image summary {probe} is damaged (it does not match its checksum); reading the image headers "
        "again"]
    assert read_summary(probe) == kept  # written again, and trusted again


def test_a_probe_summary_that_is_not_json_or_has_no_checksum_is_read_again(tmp_path: Path, cache: Path) -> None:
    root = image_tree(tmp_path / "gray", size=(8, 6), mode="L")
    first = load_dataset(f"folder:{root}")
    (probe,) = (cache / "datasets").glob("*.probe.json")
    for text in ("{not json", json.dumps({"channels": 3, "uniform": [8, 6], "median_short": 6})):
        probe.write_text(text)
        assert read_summary(probe) is None
        assert load_dataset(f"folder:{root}").train_x.shape == first.train_x.shape == (4, 1, 6, 8)


# --- 12. CSV lists: trusted like a script, each row's file checked ---------------------------------


def test_a_csv_row_may_name_a_file_outside_its_folder(tmp_path: Path) -> None:
    image_tree(tmp_path / "data")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "list.csv").write_text(f"path,label,split\n../data/train/cat/0.png,cat,train\n"
                                                 f"{tmp_path}/data/train/dog/1.png,dog,train\n"
                                                 "../data/test/dog/0.png,dog,test\n")
    data = load_dataset(f"folder:{tmp_path / 'lists' / 'list.csv'}")
    expected = np.asarray(Image.open(tmp_path / "data" / "train" / "dog" / "1.png")).transpose(2, 0, 1)
    assert data.train_y.tolist() == [0, 1] and np.array_equal(data.train_x[1].numpy(), expected)


@pytest.mark.parametrize("row, message", [
    ("train/cat/9.png", r"cannot read train/cat/9\.png \(line 3 of .*list\.csv\): No such file"),
    ("train/cat", r"train/cat \(line 3 of .*list\.csv\) is a folder, not a regular file"),
])
def test_a_csv_row_naming_a_missing_file_or_a_folder_names_the_row(tmp_path: Path, row: str, message: str) -> None:
    image_tree(tmp_path)
    (tmp_path / "list.csv").write_text(f"path,label,split\ntrain/cat/0.png,cat,train\n{row},dog,train\n"
                                       "test/cat/0.png,cat,test\n")
    for skip in (False, True):  # a broken list, not an unreadable image: skip_bad_images does not hide it
        with pytest.raises(UserError, match=message) as err:
            load_dataset(f"folder:{tmp_path / 'list.csv'}", skip_bad_images=skip)
        assert "\n" not in str(err.value)


def test_the_command_line_spells_the_parameters_the_messages_name_as_flags(tmp_path: Path, capsys) -> None:
    root = image_tree(tmp_path / "data")
    (root / "train" / "cat" / "0.png").write_bytes(b"not a png")
    assert cli.main(["train", "--dataset", f"folder:{root}", "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    assert "or pass --skip-bad-images to leave such files out" in capsys.readouterr().err
    with pytest.raises(UserError) as err:
        create_reader("folder:")
    assert cli.as_flags(str(err.value)).startswith("--dataset folder: needs a path, e.g. folder:~/images")
