"""export: ONNX (run by onnxruntime on the CPU), torch.export's .pt2 and TorchScript give PyTorch's outputs at
any batch size, load without cnnlab, and carry their metadata."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from cnnlab import run
from cnnlab.cli import main
from cnnlab.data import load_dataset
from cnnlab.data.splits import reported_test_set
from cnnlab.export import METADATA_FILE, read_metadata

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def reference(small_run):
    """64 real test images as the exported models take them (float in [0, 1]) and PyTorch's logits for them."""
    loaded = run.load(small_run)
    images, _ = reported_test_set(load_dataset("sample"), loaded.config.limit_test)
    images = images[::3][:64]
    with torch.no_grad():
        logits = loaded.model(loaded.preprocess.to_input(images))
    return images.float() / 255, logits, loaded


def check_metadata(meta, loaded):
    assert meta["classes"] == loaded.classes and len(meta["classes"]) == 10
    assert meta["image_size"] == 32 and meta["in_channels"] == 3
    assert meta["mean"] == pytest.approx(loaded.preprocess.mean) and meta["std"] == pytest.approx(loaded.preprocess.std)
    assert "[0, 1]" in meta["input"]
    assert meta["flip_tta"] is bool(loaded.config.tta)
    assert meta["tta"] == {False: "none", True: "flip", "translate": "translate"}[loaded.config.tta]


def test_onnx_matches_pytorch_on_real_images(small_run, reference, tmp_path, capsys):
    x, logits, loaded = reference
    out = tmp_path / "model.onnx"
    assert main(["export", str(small_run), "--format", "onnx", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert got.shape == logits.shape
    diff = (got - logits).abs().max().item()
    print(f"max |ONNX - PyTorch| = {diff:.3g}")
    assert diff <= 1e-4
    assert torch.equal(got.argmax(1), logits.argmax(1))
    one = session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})[0]  # any batch size
    assert (torch.from_numpy(one) - logits[:1]).abs().max() <= 1e-4
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    check_metadata(meta, loaded)
    assert read_metadata(out) == meta


def test_torchscript_matches_pytorch_on_real_images(small_run, reference, tmp_path):
    x, logits, loaded = reference
    out = tmp_path / "sub" / "model.pt"
    assert main(["export", str(small_run / "checkpoints" / "best.pt"), "--format", "torchscript",
                 "--out", str(out)]) == 0
    files = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still what users load
        model = torch.jit.load(str(out), _extra_files=files)
    with torch.no_grad():
        got = model(x)
        one = model(x[:5])
    diff = (got - logits).abs().max().item()
    print(f"max |TorchScript - PyTorch| = {diff:.3g}")
    assert diff <= 1e-4 and (one - logits[:5]).abs().max() <= 1e-4
    meta = json.loads(files[METADATA_FILE])
    check_metadata(meta, loaded)
    assert read_metadata(out) == meta


def test_pt2_matches_pytorch_on_real_images(small_run, reference, tmp_path, capsys):
    x, logits, loaded = reference
    out = tmp_path / "model.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torch.export is not deprecated: nothing to silence
        assert main(["export", str(small_run), "--format", "pt2", "--out", str(out)]) == 0
        files = {METADATA_FILE: ""}
        model = torch.export.load(out, extra_files=files).module()
    assert "(pt2; max |difference| from PyTorch" in capsys.readouterr().out
    with torch.no_grad():
        got, one = model(x), model(x[:1])
    diff = (got - logits).abs().max().item()
    print(f"max |pt2 - PyTorch| = {diff:.3g}")
    assert diff <= 1e-4 and (one - logits[:1]).abs().max() <= 1e-4
    assert torch.equal(got.argmax(1), logits.argmax(1))
    meta = json.loads(files[METADATA_FILE])
    check_metadata(meta, loaded)
    assert read_metadata(out) == meta


# Loads an exported file with torch or onnxruntime alone and runs it on the batches saved beside it.
RUN_ALONE = """
import sys, torch
fmt, path, batches, out = sys.argv[1:]
xs = torch.load(batches)
if fmt == "onnx":
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    model = lambda x: torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
elif fmt == "pt2":
    model = torch.export.load(path).module()
else:
    model = torch.jit.load(path)
with torch.no_grad():
    torch.save([model(x) for x in xs], out)
assert "cnnlab" not in sys.modules
"""


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
def test_each_format_runs_without_cnnlab_as_the_model_does_at_any_batch_size(small_run, tmp_path, fmt):
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(small_run), "--format", fmt, "--out", str(out)]) == 0
    loaded = run.load(small_run)
    own = nn.Sequential(loaded.preprocess.normalizer(), loaded.model).eval()  # what the file must compute
    generator = torch.Generator().manual_seed(5)
    xs = [torch.rand(n, 3, 32, 32, generator=generator) for n in (7, 1)]  # exported with a batch of 2
    torch.save(xs, tmp_path / "batches.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", RUN_ALONE, fmt, str(out), str(tmp_path / "batches.pt"),
                           str(tmp_path / "got.pt")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        for x, got in zip(xs, torch.load(tmp_path / "got.pt")):
            expected = own(x)
            assert got.shape == expected.shape == (len(x), 10)
            assert (got - expected).abs().max().item() <= 1e-4


def test_export_to_a_folder_is_a_user_error(small_run, tmp_path, capsys):
    assert main(["export", str(small_run), "--format", "torchscript", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a folder" in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
