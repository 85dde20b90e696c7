"""The core contract: one decoder for every reader, the checkpoint schema, atomic files."""

import io
import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import cli, run
from cnnlab.core import checkpoint, images
from cnnlab.core.files import atomic_write
from cnnlab.core.spec import ModelSpec, Preprocess
from cnnlab.predict import predict
from cnnlab.visualize import visualize


def odd_images(folder):
    """Files whose decoding has traps: EXIF rotation, a non-square shape, 16-bit gray, a palette."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    paths = {}
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6  # stored sideways: the viewer rotates it 90°
    paths["rotated"] = folder / "rotated.jpg"
    Image.fromarray(rgb).save(paths["rotated"], exif=exif.tobytes())
    paths["wide"] = folder / "wide.png"
    Image.fromarray(rgb).save(paths["wide"])
    paths["gray16"] = folder / "gray16.png"
    Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)).save(paths["gray16"])
    paths["palette"] = folder / "palette.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(paths["palette"])
    return paths


class Inputs:
    """Records the first tensor a model's forward receives per call."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.register_forward_pre_hook(lambda m, args: self.seen.append(args[0].detach().clone()))

    def close(self):
        self.handle.remove()


def test_predict_and_visualize_feed_the_network_the_same_pixels(small_run, tmp_path, monkeypatch):
    paths = odd_images(tmp_path)
    loaded = run.load(small_run)
    monkeypatch.setattr(run, "load", lambda *a, **k: loaded)  # so that the hook sees both commands' inputs
    for name, path in paths.items():
        rec = Inputs(loaded.model)
        predict(small_run, [path], tta=False)
        visualize("features", small_run, image=[str(path)], layer=["conv1"], out=tmp_path / "viz", device="cpu")
        rec.close()
        predicted, visualized = rec.seen[0], rec.seen[-1]
        assert predicted.shape == (1, 3, 32, 32)
        assert torch.equal(predicted, visualized), name
    # The decoder itself: rotation applied, the centred square kept, 16 bits rescaled, the palette expanded.
    rotated = images.decode(paths["rotated"], 3)
    assert rotated.shape == (3, 50, 30)
    assert images.decode(paths["wide"], 3, max_side=256).shape == (3, 30, 30)
    gray = np.asarray(Image.open(paths["gray16"])).astype(np.float64)
    assert np.abs(images.decode(paths["gray16"], 1)[0] - np.rint(gray / 257)).max() <= 1
    assert images.decode(paths["palette"], 3).shape == (3, 30, 50)


def test_a_schema_1_checkpoint_still_loads(small_run, tmp_path):
    """Checkpoints written before the schema was versioned: image size in model_spec, a normalize entry."""
    state = checkpoint.load(small_run / "checkpoints" / "last.pt")
    old = {k: v for k, v in state.items() if k not in ("schema", "preprocess")}
    pre = state["preprocess"]
    old["model_spec"] = {**state["model_spec"], "image_size": pre["size"]}
    old["normalize"] = {"mean": pre["mean"], "std": pre["std"]}
    torch.save(old, tmp_path / "old.pt")
    ckpt = checkpoint.read(tmp_path / "old.pt")
    assert ckpt.spec == ModelSpec("resnet18-cifar", 10, 8, 3)
    assert ckpt.preprocess == Preprocess(32, 3, tuple(pre["mean"]), tuple(pre["std"]))
    assert ckpt.step == state["step"]
    loaded, new = run.load(tmp_path / "old.pt"), run.load(small_run / "checkpoints" / "last.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), new.model(x))


def test_a_checkpoint_from_a_newer_schema_is_refused_in_one_line(small_run, tmp_path, capsys):
    state = checkpoint.load(small_run / "checkpoints" / "last.pt")
    torch.save({**state, "schema": 99}, tmp_path / "new.pt")
    assert cli.main(["evaluate", str(tmp_path / "new.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "schema 99" in err and "upgrade cnnlab" in err


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write(target, json.dumps({"a": 1}))

    def half(f):
        f.write(b'{"a": ')
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, half)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_atomic_write_gives_the_permissions_open_would(tmp_path):
    old = os.umask(0o022)
    try:
        new = atomic_write(tmp_path / "report.html", "<p>")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644  # not mkstemp's private 0600
        os.umask(0o077)
        assert stat.S_IMODE(atomic_write(tmp_path / "private.json", "{}").stat().st_mode) == 0o600
        new.chmod(0o640)
        atomic_write(new, "<p>again")  # a file replaced keeps its own permissions, as open("w") would
        assert stat.S_IMODE(new.stat().st_mode) == 0o640 and new.read_text() == "<p>again"
    finally:
        os.umask(old)


def test_visualize_by_index_on_a_run_that_skipped_bad_images(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for c, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                buf = io.BytesIO()
                Image.fromarray(np.full((12, 12, 3), 60 * c + 10 * i, np.uint8)).save(buf, "PNG")
                (root / split / cls / f"{i}.png").write_bytes(buf.getvalue())
    (root / "test" / "cat" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", f"folder:{root}", "--skip-bad-images", "--model", "resnet18-cifar",
                     "--width", "2", "--image-size", "8", "--epochs", "1", "--batch-size", "4", "--val-split", "0",
                     "--device", "cpu", "--out", str(out)]) == 0
    written = visualize("features", out, index=[7], layer=["conv1"], device="cpu")
    assert written and all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert run.load(out).test_set()[1].tolist() == [0] * 4 + [1] * 4  # the broken file left out, as in training
