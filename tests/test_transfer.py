"""Pretrained weights and fine-tuning: ``--weights``, ``--freeze``, ``--backbone-lr-scale``, the finetune recipe.

Nothing here downloads anything. torchvision's and timm's published weights are exercised through their
real loading paths with files these tests write themselves, where each library caches what it downloads:
torchvision's ``$TORCH_HOME/hub/checkpoints/<file named by the URL, with the SHA-256 prefix that
torchvision checks when it downloads>``, and the Hugging Face Hub cache that timm reads
(``models--timm--NAME/snapshots/<commit>/model.safetensors``, with ``refs/main`` naming the commit).
The weights in those files are random; what is tested is that they arrive, head resized, in the model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import cli, run
from cnnlab.config import resolve
from cnnlab.core.errors import UserError
from cnnlab.models import build, head_path
from cnnlab.models import weights as pretrained
from cnnlab.models.transfer import frozen_prefix, param_groups
from cnnlab.train.engine import train

IMAGENET_MEAN = (0.485, 0.456, 0.406)


def _gratings(rng: np.random.Generator, angle: float, n: int) -> list[np.ndarray]:
    """Noisy coloured stripes at ``angle`` degrees, random frequency, phase and colour: 32×32 RGB."""
    y, x = np.mgrid[0:32, 0:32].astype(np.float32)
    images = []
    for _ in range(n):
        theta = np.deg2rad(angle + rng.normal(0, 3))
        wave = np.sin(2 * np.pi * rng.uniform(0.08, 0.2) * (x * np.cos(theta) + y * np.sin(theta))
                      + rng.uniform(0, 2 * np.pi))
        image = 0.5 + 0.4 * wave[..., None] * rng.uniform(0.2, 1.0, 3) + rng.normal(0, 0.3, (32, 32, 3))
        images.append((np.clip(image, 0, 1) * 255).astype(np.uint8))
    return images


def _folder(root: Path, angles: list[int], train: int, test: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for angle in angles:
        for split, n in (("train", train), ("test", test)):
            folder = root / split / f"stripes{angle:03d}"
            folder.mkdir(parents=True)
            for i, image in enumerate(_gratings(rng, angle, n)):
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


COMMON = dict(recipe="fast", model="resnet20", width=8, image_size=32, device="cpu", tta=False, val_split=0,
              augment="none")


def _last(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"test_acc"' in line][-1]


def test_finetuning_a_pretrained_file_beats_training_from_scratch(tmp_path, one_thread):
    # Pretraining on half of the classes (stripes at 0°, 36° … 144°); the task is the other half (18° … 162°)
    # with 8 training images a class: too few to learn orientation from scratch, enough to fit a new head.
    source = _folder(tmp_path / "source", [0, 36, 72, 108, 144], train=80, test=10, seed=0)
    target = _folder(tmp_path / "target", [18, 54, 90, 126, 162], train=8, test=30, seed=1)
    base = train(resolve(overrides=dict(COMMON, dataset=f"folder:{source}", epochs=3, lr=0.2, batch_size=64,
                                        out=str(tmp_path / "pretrain")))).run_dir
    file = tmp_path / "resnet20-stripes.pth"  # the published format: a bare state dict
    torch.save(run.load(base).model.state_dict(), file)

    def fit(name: str, **extra) -> Path:
        cfg = resolve(overrides=dict(COMMON, dataset=f"folder:{target}", epochs=5, batch_size=16, lr=0.1,
                                     out=str(tmp_path / name), **extra))
        return train(cfg).run_dir

    scratch = fit("scratch")
    tuned = fit("finetune", weights=str(file), backbone_lr_scale=0.1)
    frozen = fit("frozen", weights=str(file), freeze="backbone")
    scratch_acc, tuned_acc = _last(scratch)["test_acc"], _last(tuned)["test_acc"]
    assert tuned_acc > scratch_acc + 0.15, (tuned_acc, scratch_acc)
    assert _last(frozen)["test_acc"] > scratch_acc + 0.15

    config = json.loads((tuned / "config.json").read_text())
    assert config["weights"]["source"] == f"file:{file}" and config["frozen_tensors"] == 0
    groups = torch.load(tuned / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["max_lr"] for g in groups] == pytest.approx([0.1, 0.01])  # head first, then the backbone (one-cycle)

    # Frozen: the backbone, batch-norm statistics included, is exactly the file's; only the head moved.
    weights, trained = torch.load(file, weights_only=True), run.load(frozen).model.state_dict()
    assert json.loads((frozen / "config.json").read_text())["frozen_tensors"] > 0
    assert all(torch.equal(value, weights[key]) for key, value in trained.items() if not key.startswith("fc."))
    assert not torch.equal(trained["fc.weight"], weights["fc.weight"])  # 5 classes both: the file's head, trained on


def test_torchvision_weights_through_its_own_cache(tmp_path, monkeypatch, one_thread):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    published = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(published.url).name
    assert cached.name.startswith("mobilenet_v3_small-") and len(cached.stem.rsplit("-", 1)[1]) == 8  # hash prefix

    # Offline and not cached: one line that says where the file goes. (No real request is made.)
    def offline(url, dst, hash_prefix=None, progress=True):
        assert hash_prefix == cached.stem.rsplit("-", 1)[1]  # torchvision asks for its checksum
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    model = build("torchvision:mobilenet_v3_small", num_classes=10)
    with pytest.raises(UserError, match=f"put the file at {cached}"):
        pretrained.load(model, "torchvision:mobilenet_v3_small", "DEFAULT")

    torch.manual_seed(1)
    theirs = torchvision.models.mobilenet_v3_small(num_classes=1000).state_dict()
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(theirs, cached)

    # Their preprocessing becomes the run's unless a flag says otherwise.
    cfg = resolve(overrides=dict(recipe="fast", dataset="sample", model="torchvision:mobilenet_v3_small",
                                 weights="DEFAULT"))
    assert (cfg.image_size, cfg.mean, cfg.std) == (224, IMAGENET_MEAN, (0.229, 0.224, 0.225))
    info = pretrained.load(model, "torchvision:mobilenet_v3_small", "IMAGENET1K_V1")
    assert info.source == "torchvision:MobileNet_V3_Small_Weights.IMAGENET1K_V1" and info.image_size == 224
    ours = model.state_dict()
    head = head_path(model)
    assert ours[f"{head}.weight"].shape == (10, 1024)
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items() if not k.startswith(head))

    # Grayscale: the stem's filters are summed over the colours.
    gray = build("torchvision:mobilenet_v3_small", num_classes=10, in_channels=1)
    pretrained.load(gray, "torchvision:mobilenet_v3_small", "DEFAULT")
    assert torch.allclose(gray.features[0][0].weight, theirs["features.0.0.weight"].sum(1, keepdim=True))

    # A whole run from them: trains (32 px here, to be quick), records where they came from and what they expect.
    run_dir = train(resolve(overrides=dict(
        recipe="finetune", dataset="sample", model="torchvision:mobilenet_v3_small", image_size=32, epochs=1,
        batch_size=32, limit_train=64, limit_test=32, val_split=0, device="cpu", out=str(tmp_path / "run")))).run_dir
    config = json.loads((run_dir / "config.json").read_text())
    assert config["weights"] == {"source": "torchvision:MobileNet_V3_Small_Weights.IMAGENET1K_V1",
                                 "image_size": 224, "mean": list(IMAGENET_MEAN), "std": [0.229, 0.224, 0.225]}
    loaded = run.load(run_dir)
    assert loaded.preprocess.mean == IMAGENET_MEAN and loaded.preprocess.size == 32
    assert config["config"]["backbone_lr_scale"] == 0.1


def test_timm_weights_through_the_hub_cache(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    import huggingface_hub.constants as hub
    from safetensors.torch import save_file

    name = "test_resnet.r160_in1k"
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.hf_hub_id == f"timm/{name}"
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--timm--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.manual_seed(2)
    theirs = timm.create_model("test_resnet", num_classes=1000).state_dict()
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(snapshot / "model.safetensors"))

    found = pretrained.describe("timm:test_resnet", "DEFAULT")
    assert found.source == f"timm:{name}"
    assert (found.image_size, found.mean, found.std) == (160, tuple(cfg.mean), tuple(cfg.std))
    model = build("timm:test_resnet", num_classes=5)
    pretrained.load(model, "timm:test_resnet", "r160_in1k")
    ours = model.state_dict()
    assert ours["fc.weight"].shape[0] == 5
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items() if not k.startswith("fc."))
    with pytest.raises(UserError,
                       match="timm has no weights 'nope' for test_resnet; choose DEFAULT or one of: r160_in1k"):
        pretrained.describe("timm:test_resnet", "nope")


def test_freeze_and_learning_rate_groups():
    model = build("resnet20", width=4)
    frozen = frozen_prefix(model, "conv3_x")
    assert frozen[0] == "conv1.0.weight" and frozen[-1].startswith("layer2.")
    assert not any(n.startswith(("layer3.", "fc.")) for n in frozen)
    assert frozen_prefix(model, "layer1.2") == [n for n in frozen if n.startswith(("conv1.", "layer1."))]
    assert set(frozen_prefix(model, "backbone")) == {n for n, _ in model.named_parameters()} - {"fc.weight", "fc.bias"}
    groups = param_groups(model, 0.1, 0.1)
    assert [g["lr"] for g in groups] == [0.1, pytest.approx(0.01)]
    assert groups[0]["params"] == [model.fc.weight, model.fc.bias]
    assert param_groups(model, 0.1)[0]["params"] == list(model.parameters())  # one group, the usual order


BAD = [
    (["--model", "resnet9"], "unknown model 'resnet9'"),
    (["--model", "torchvision:resnet9"], "torchvision has no classification model 'resnet9'"),
    (["--model", "resnet20", "--weights", "DEFAULT"], "model resnet20 has no published weights"),
    (["--model", "torchvision:resnet18", "--weights", "IMAGENET9"], "torchvision has no weights 'IMAGENET9'"),
    (["--model", "resnet20", "--weights", "missing.pth"], "--weights missing.pth: no such file"),
    (["--model", "resnet20", "--weights", "{text}"], "truncated or corrupt"),
    (["--model", "resnet20", "--weights", "{other}"], "do not fit this model"),
    (["--model", "resnet20", "--freeze", "conv5_x"], "--freeze conv5_x: the model has no such layer"),
    (["--model", "resnet20", "--freeze", "fc"], "would freeze the classifier"),
    (["--model", "resnet20", "--backbone-lr-scale", "-1"], "--backbone-lr-scale must be"),
]


@pytest.mark.parametrize("flags, message", BAD, ids=[m for _, m in BAD])
def test_bad_model_weights_and_freeze_values_get_one_line(flags, message, tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    other = tmp_path / "vgg.pth"
    torch.save(build("vgg11-cifar", width=2).state_dict(), other)
    flags = [f.format(text=text, other=other) for f in flags]
    code = cli.main(["train", "--dataset", "sample", "--limit-train", "64", "--limit-test", "32", "--epochs", "1",
                     "--device", "cpu", "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_local_cnnlab_checkpoint_brings_its_preprocessing(small_run, tmp_path):
    cfg = resolve(overrides=dict(recipe="seed", dataset="sample", model="resnet18-cifar", width=8,
                                 weights=str(small_run / "checkpoints" / "last.pt")))
    loaded = run.load(small_run)
    assert (cfg.image_size, cfg.mean, cfg.std) == (loaded.preprocess.size, loaded.preprocess.mean,
                                                   loaded.preprocess.std)
    model = build("resnet18-cifar", width=8)
    pretrained.load(model, "resnet18-cifar", str(small_run / "checkpoints" / "last.pt"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()))
    if importlib.util.find_spec("safetensors"):
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({f"module.{k}": v.contiguous() for k, v in loaded.model.state_dict().items()}, str(path))
        fresh = build("resnet18-cifar", width=8, in_channels=1)
        pretrained.load(fresh, "resnet18-cifar", str(path))  # DistributedDataParallel's prefix and a gray stem
        assert torch.allclose(fresh.conv1[0].weight, loaded.model.conv1[0].weight.sum(1, keepdim=True))
