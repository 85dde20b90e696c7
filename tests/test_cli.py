"""The command line: JSON outputs, evaluate, and one clear line with exit 2 for every user mistake."""

import json
import subprocess
import sys

import pytest
from PIL import Image
from test_train import read_metrics, tiny

from cnnlab.cli import main
from cnnlab.train import engine


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return engine.train(tiny(tmp_path_factory.mktemp("cli") / "run")).run_dir


def test_summary_json_reproduces_table1(capsys):
    assert main(["summary", "resnet18", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["params"] == 11_689_512 and abs(doc["macs"] / 1.814e9 - 1) < 0.01
    assert [s["name"] for s in doc["stages"]] == ["conv1", "conv2_x", "conv3_x", "conv4_x", "conv5_x", "pool", "fc"]
    assert doc["stages"][4]["output_size"] == [512, 7, 7]


def test_evaluate_json_matches_the_run(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"top1", "n", "per_class", "confusion", "calibration", "per_class_figures"} <= set(doc)
    assert doc["n"] == 200 and sum(map(sum, doc["confusion"])) == 200
    diagonal = sum(doc["confusion"][i][i] for i in range(10))
    assert doc["top1"] == pytest.approx(diagonal / 200)
    # It scored best.pt, chosen by validation accuracy, on the test images the run reported on.
    epochs = [r for r in read_metrics(run_dir) if r["kind"] == "epoch"]
    best = max(epochs, key=lambda r: r["val_acc"])
    assert doc["top1"] == pytest.approx(best["test_acc"], abs=1e-9)
    for i, (_name, acc) in enumerate(doc["per_class"].items()):
        row = doc["confusion"][i]
        assert acc == pytest.approx(row[i] / sum(row))
    png = Image.open(run_dir / "eval" / "confusion.png")
    assert png.size[0] > 400 and len(png.getcolors(1 << 16) or range(300)) > 20


def test_evaluate_and_predict_take_each_tta_of_training(run_dir, capsys, tmp_path):
    """--tta translate (airbench's six views), --tta (flip) and --no-tta score as ``score`` does with them."""
    import torch

    from cnnlab import run
    from cnnlab.core.metrics import logits, score

    loaded = run.load(run_dir)
    images, labels = loaded.test_set()
    for flags, tta in ((["--tta", "translate"], "translate"), (["--tta"], True), (["--no-tta"], False)):
        assert main(["evaluate", str(run_dir), "--json", "--out", str(tmp_path / "eval"), *flags]) == 0
        doc = json.loads(capsys.readouterr().out)
        expected = score(loaded.model, images, labels, loaded.preprocess, tta=tta)
        right = (expected.predictions == labels).float().mean().item()
        written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        assert written["tta"] == tta and doc["top1"] == pytest.approx(right)
        assert written["loss"] == pytest.approx(expected.loss, rel=1e-5)
    # The six views give other probabilities than the flips alone, and predict gives the six views' ones.
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    assert main(["predict", str(run_dir), str(tmp_path / "a.png"), "--tta", "translate", "--json", "--top-k", "1"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"][0]
    with torch.no_grad():
        six = torch.softmax(logits(loaded.model, loaded.preprocess.to_input(images[:1]), "translate"), 1)[0]
        flip = torch.softmax(logits(loaded.model, loaded.preprocess.to_input(images[:1]), True), 1)[0]
    assert top["label"] == loaded.classes[six.argmax()] and top["prob"] == pytest.approx(six.max().item(), abs=1e-5)
    assert not torch.allclose(six, flip, atol=1e-5)
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal: one line, exit 2
        main(["evaluate", str(run_dir), "--tta", "shift"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert all(word in err for word in ("--tta", "translate", "shift"))
    # A bare --tta before the run folder is the flip flag, not a value: the folder stays the folder.
    assert main(["evaluate", "--tta", str(run_dir), "--json", "--out", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["tta"] is True


def test_train_takes_the_tta_values_that_evaluate_takes(capsys):
    """train's --tta is spelt as evaluate's: --tta and --tta flip are the flips, --tta translate the six views."""
    from cnnlab.cli import build_parser
    from cnnlab.config import resolve

    for flags, tta in ((["--tta"], True), (["--tta", "flip"], True), (["--tta", "translate"], "translate"),
                       (["--no-tta"], False), ([], None)):
        given = vars(build_parser().parse_args(["train", *flags, "--epochs", "1"]))
        assert given.get("tta") == tta and given["epochs"] == 1
        if tta is not None:
            assert resolve("fast", overrides={"tta": given["tta"]}).tta == tta
    with pytest.raises(SystemExit) as stop:
        main(["train", "--tta", "shift"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert all(word in err for word in ("--tta", "flip", "translate", "shift")) and "file" not in err


def one_error_line(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize("argv, words", [
    (["train", "--model", "vgg19"], ["resnet18", "resnet18-seed", "resnet18-cifar", "vgg16", "torchvision:NAME"]),
    (["train", "--recipe", "slow"], ["seed", "paper", "fast"]),
    (["train", "--dataset", "imagenet"], ["cifar10", "sample", "folder:PATH"]),
    (["train", "--batch-size", "0"], ["--batch-size"]),
    (["train", "--lr", "-1"], ["--lr"]),
    (["train", "--epochs", "0"], ["--epochs"]),
    (["train", "--epochs", "three"], ["--epochs", "invalid int"]),
    (["summary", "googlenet"], ["resnet18-cifar", "alexnet"]),
    (["evaluate", "/nonexistent/run"], ["/nonexistent/run"]),
])
def test_user_errors_are_one_line_and_exit_2(capsys, argv, words):
    try:
        one_error_line(capsys, argv, *words)
    except SystemExit as e:  # argparse's own usage errors exit from inside parse_args
        assert e.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_missing_cifar10_says_where_it_looked_and_how_to_fix(capsys, tmp_path):
    one_error_line(capsys, ["train", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "r")],
                   str(tmp_path / "data"), "--download")
    assert not (tmp_path / "r").exists()  # a failed start leaves no empty run folder behind


def test_resume_without_checkpoint_is_explained(capsys, tmp_path):
    one_error_line(capsys, ["train", "--resume", str(tmp_path)], "no checkpoints/last.pt")


def test_training_into_an_existing_run_is_refused(capsys, run_dir):
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    one_error_line(capsys, ["train", "--dataset", "sample", "--out", str(run_dir)], "--resume")
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before


def test_no_traceback_from_the_real_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--model", "nope"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown model 'nope'" in proc.stderr
