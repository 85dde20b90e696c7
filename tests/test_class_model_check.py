"""Class models shown to an independently trained run (``--check-with``), and the colours of activation
maximisation measured on the run's own training data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import run as runs
from cnnlab.cli import main
from cnnlab.inspect import Inspection
from cnnlab.viz.maximize import FourierImage, color_sqrt

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["cat", "ship", "frog"]


def _train(out: Path, **settings) -> Path:
    from cnnlab.config import resolve
    from cnnlab.train.engine import train

    base = dict(recipe="fast", dataset="sample", model="resnet18-cifar", width=2, image_size=32, epochs=1,
                batch_size=64, lr=0.2, limit_train=300, limit_test=50, device="cpu", tta=False)
    return train(resolve(overrides={**base, **settings, "out": str(out)})).run_dir


@pytest.fixture(scope="module")
def other_run(tmp_path_factory) -> Path:
    """An independent run of another architecture on the same classes and image size."""
    return _train(tmp_path_factory.mktemp("check") / "plain", model="plain20", width=4, seed=7)


@pytest.fixture(scope="module")
def smaller_run(tmp_path_factory) -> Path:
    """A run on the same classes at 16 px."""
    return _train(tmp_path_factory.mktemp("check") / "small", image_size=16, limit_train=100)


@pytest.fixture(scope="module")
def other_classes_run(tmp_path_factory) -> Path:
    """A run at 32 px on two classes of its own."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        for cls in ("apple", "pear"):
            (root / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return _train(root / "run", dataset=f"folder:{root}", batch_size=4, limit_train=None, limit_test=None)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_check_numbers_are_the_other_runs_forward_pass_on_the_saved_class_models(small_run, other_run, tmp_path,
                                                                                  capsys):
    from cnnlab.visualize import shown

    argv = ["visualize", "maximize", str(small_run), "--target", *TARGETS, "--steps", "4", "--check-with",
            str(other_run), "--out", str(tmp_path / "cli")]
    assert main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    check = printed["results"][0]["check"]
    assert printed["results"][0]["names"] == TARGETS and check["n"] == 3
    assert printed["results"][0]["colour"] == "the colours of the run's 900 training images"

    # The same class models through the Python API; each saved as an 8-bit PNG, read back and shown to the
    # other run's model directly.
    results, _ = shown("maximize", small_run, out=tmp_path / "api", target=TARGETS, steps=4, check_with=other_run)
    drawn = results[0]
    other = runs.load(other_run)
    files = []
    for k, pixels in enumerate(drawn.pixels):
        files.append(tmp_path / f"class{k}.png")
        Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(files[-1])
    with torch.no_grad():
        probs = other.model(other.preprocess.from_files(files)).softmax(1)
    classes = [other.classes.index(t) for t in TARGETS]
    direct = probs[torch.arange(3), classes]
    assert check["p_target"] == pytest.approx(direct.tolist(), abs=1e-5)
    assert check["is_top1"] == (probs.argmax(1) == torch.tensor(classes)).tolist()
    assert check["predicted"] == probs.argmax(1).tolist()
    assert check["mean_p_target"] == pytest.approx(float(direct.mean()), abs=1e-5)
    assert check["top1"] == sum(check["is_top1"])
    # The run's own probabilities are its model's on the class models, and differ from the other run's.
    mine = runs.load(small_run)
    with torch.no_grad():
        own = mine.model(mine.preprocess.normalizer()(drawn.pixels)).softmax(1)
    assert printed["results"][0]["values"] == pytest.approx(own[torch.arange(3), classes].tolist(), abs=1e-5)
    assert not np.allclose(printed["results"][0]["values"], check["p_target"], atol=1e-3)

    # Without --json: a caption line per class model, and the summary line.
    for k, label in enumerate(drawn.labels):
        top = "top-1" if check["is_top1"][k] else f"top-1 {other.classes[check['predicted'][k]]}"
        assert label.splitlines()[2] == f"other run p = {check['p_target'][k]:.2f}, {top}"
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"class models checked with {other.path}: mean p(target) {check['mean_p_target']:.2f}, "
                      f"{check['top1']} of 3 top-1")
    assert out[1] == f"wrote {tmp_path / 'cli' / 'classes.png'}"


@pytest.mark.parametrize("which, words", [
    ("smaller_run", ["--check-with", "16-px", "32 px", "same size"]),
    ("other_classes_run", ["--check-with", "apple, pear", "same classes"]),
    ("small_run", ["--check-with", "independently"]),
])
def test_a_run_that_cannot_check_the_class_models_is_one_line(small_run, request, which, words, tmp_path, capsys):
    other = request.getfixturevalue(which)
    capsys.readouterr()  # what training the fixture printed
    for argv in (["visualize", "maximize", str(small_run), "--target", "cat", "--steps", "1"],
                 ["report", str(small_run)]):
        out = tmp_path / "out"
        assert main([*argv, "--check-with", str(other), "--out", str(out)]) == 2
        err = _one_error_line(capsys)
        assert all(w in err for w in words), err
        assert not out.exists()  # refused before anything is drawn or written


@pytest.mark.parametrize("argv, words", [
    (["maximize", "--layer", "conv4_x", "--channel", "0"], ["--check-with", "class models", "channel"]),
    (["features"], ["features does not use --check-with"]),
    (["sanity"], ["sanity does not use --check-with"]),
])
def test_check_with_where_there_is_no_class_model_is_refused(small_run, other_run, argv, words, capsys):
    capsys.readouterr()
    assert main(["visualize", argv[0], str(small_run), *argv[1:], "--check-with", str(other_run)]) == 2
    err = _one_error_line(capsys)
    assert all(w in err for w in words), err


def test_report_states_the_check(small_run, other_run, monkeypatch):
    from cnnlab.report import page, sections

    monkeypatch.setattr(sections, "PATTERN_CLASSES", 4)  # the first four classes, to keep the test short
    inspection = Inspection.open(small_run, device="cpu")
    contents = sections.Contents(small_run, {}, [], [], 0, inspection.run.path, None, inspection.classes)
    sections._class_models(contents, inspection, other_run)
    check = contents.pattern_check
    again = inspection.maximize_classes(list(range(4)), steps=contents.pattern_steps, check_with=other_run).check
    assert check.classes == [0, 1, 2, 3]
    assert check.probabilities.tolist() == pytest.approx(again.probabilities.tolist(), abs=1e-6)
    html = page._class_models(contents)
    assert (f'<span id="class-model-check">mean p(target) {check.mean:.2f}, {sum(check.top1)} of 4 top-1</span>'
            in html)
    assert "the colours of the run&#x27;s 900 training images" in html and len(contents.patterns) == 1


def test_colour_matrix_squares_to_the_training_images_colour_covariance(small_run):
    inspection = Inspection.open(small_run, device="cpu")
    colours = inspection.colours()
    assert inspection.colours() is colours  # measured once
    images, _ = inspection.run.training_set()
    pixels = torch.as_tensor(images[:]).double().div(255).transpose(0, 1).reshape(3, -1)
    covariance = torch.cov(pixels)
    m = colours.sqrt.double()
    assert m @ m.T == pytest.approx(covariance.numpy(), rel=1e-4, abs=1e-7)
    assert (m[0] >= 0).all()  # lucid's orientation
    # ImageNet's is not the data's: CIFAR's colours are measurably different.
    assert colours.source == "the colours of the run's 900 training images"


def test_color_sqrt_recovers_a_known_covariance_and_whitens():
    g = torch.Generator().manual_seed(0)
    mixing = torch.tensor([[0.20, 0.05, 0.00], [0.15, 0.10, -0.04], [0.10, 0.12, 0.06]])
    noise = torch.randn(3, 200_000, generator=g, dtype=torch.float64)
    values = 0.5 + mixing.double() @ noise  # pixels whose covariance is mixing @ mixing.T
    pixels = values.reshape(3, 2000, 10, 10).transpose(0, 1)
    m = color_sqrt(pixels, chunk=300).double()
    expected = (mixing @ mixing.T).double()
    assert m @ m.T == pytest.approx(expected.numpy(), abs=2e-4)
    # Decorrelated by it, the colours are white: FourierImage takes white noise to the data's correlations.
    white = torch.linalg.solve(m, values - values.mean(1, keepdim=True))
    assert torch.cov(white) == pytest.approx(torch.eye(3).numpy(), abs=0.02)
    image = FourierImage(torch.full((1, 3, 8, 8), 0.5), color=m.float())
    assert torch.allclose(image.color, (m / m.norm(dim=0).max()).float())
