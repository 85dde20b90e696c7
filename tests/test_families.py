"""Every family of models through every command: trained for a few steps at tiny width on the CPU, then
summarised, looked inside (feature maps, Grad-CAM, an attribution), predicted, evaluated and exported.

The 224 px giants (ResNet-50 … 152, VGG at 224) are counted in test_models.py without a forward pass at
full width; here each family trains at 32 px, the largest ImageNet-style ones at width 2 or 4.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cnnlab import cli, run
from cnnlab.config import resolve
from cnnlab.models.summary import summarize
from cnnlab.train.engine import train
from cnnlab.viz.attribute import guided_backprop
from cnnlab.viz.cam import grad_cam
from cnnlab.viz.features import feature_maps
from cnnlab.viz.layers import default_layer, first_layer

HAS_TIMM = importlib.util.find_spec("timm") is not None

# One model per family, the smallest of each (name → width; None for torchvision's and timm's own widths).
FAMILIES = {
    "resnet50": 2,  # Table 1, bottlenecks, 7×7 stem: still trains at 32 px
    "plain18": 4,
    "resnet20": 4,  # CIFAR, option-A shortcuts
    "plain20": 4,
    "alexnet-cifar": 4,
    "vgg11-cifar": 4,
    "torchvision:mobilenet_v3_small": None,
    "timm:test_efficientnet": None,
}
# The last spatial feature block at 32 px: a stage where the model has stages, else a module path. ResNet-50 and
# the plain 18-layer net are ImageNet nets: at 32 px their conv5_x is 1×1, so the last stage with a map is conv4_x.
LAST_BLOCK = {"resnet50": "conv4_x", "plain18": "conv4_x", "resnet20": "conv4_x", "plain20": "conv4_x",
              "alexnet-cifar": "conv5", "vgg11-cifar": "conv5", "torchvision:mobilenet_v3_small": "features.9.block.0",
              "timm:test_efficientnet": "blocks.4.0.bn1"}
ONNX_CHECKED = {"resnet20", "timm:test_efficientnet"}


def _train(name: str, width: int | None, out: Path) -> Path:
    cfg = resolve(overrides=dict(recipe="fast", dataset="sample", model=name, width=width, image_size=32,
                                 epochs=1, batch_size=32, lr=0.05, limit_train=96, limit_test=32, val_split=32,
                                 device="cpu", tta=False, out=str(out)))
    return train(cfg).run_dir


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_through_every_command(name, tmp_path, capsys, one_thread):
    if name.startswith("timm:") and not HAS_TIMM:
        pytest.skip("timm is not installed: pip install 'cnnlab[timm]'")
    run_dir = _train(name, FAMILIES[name], tmp_path / "run")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epoch = [m for m in metrics if "test_acc" in m][-1]
    assert epoch["step"] == 2 and torch.isfinite(torch.tensor(epoch["train_loss"]))

    loaded = run.load(run_dir)
    assert loaded.spec.name == name and loaded.spec.width == FAMILIES[name]

    # summary: counted on the model as trained
    summary = summarize(name, image_size=32, num_classes=10, width=FAMILIES[name])
    assert summary["params"] == sum(p.numel() for p in loaded.model.parameters())

    # looking inside: every method finds its default layer in the model
    pre = loaded.preprocess
    x = pre.to_input(loaded.test_set()[0][:2])
    layer = default_layer(loaded.model, x)
    assert layer == LAST_BLOCK[name], layer
    maps = feature_maps(loaded.model, x)
    assert maps.ndim == 4 and maps.shape[-1] > 1
    first = feature_maps(loaded.model, x, layer=first_layer(loaded.model))
    assert first.shape[-1] >= maps.shape[-1]
    heat = grad_cam(loaded.model, x)
    assert heat.shape == (2, 1, 32, 32) and torch.isfinite(heat).all() and heat.min() >= 0
    guided = guided_backprop(loaded.model, x, target=1)
    assert guided.shape == x.shape and torch.isfinite(guided).all() and guided.abs().sum() > 0

    # predict and evaluate
    x, y = loaded.test_set()
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(image)
    assert cli.main(["predict", str(run_dir), str(image), "--json", "--device", "cpu", "--top-k", "2"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert len(predicted) == 1 and len(predicted[0]["top"]) == 2
    assert cli.main(["evaluate", str(run_dir), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 32

    # export: agrees with PyTorch within 1e-4 (export() checks before it writes). ONNX conversion takes 10–25 s
    # a model on two cores, so it runs for the families with operations of their own (option A's padding;
    # timm's SiLU and squeeze-and-excitation); test_export.py covers it on a ResNet.
    if name in ONNX_CHECKED and importlib.util.find_spec("onnxruntime"):
        assert cli.main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert cli.main(["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    capsys.readouterr()


def _hooked_grad_cam(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, module: torch.nn.Module):
    """Grad-CAM written out (Selvaraju et al. 2017, Eq. 1–2) with one forward hook: the reference."""
    store = {}
    handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with torch.enable_grad():
            scores = model(x).gather(1, target[:, None]).sum()
            (g,) = torch.autograd.grad(scores, store["a"])
    finally:
        handle.remove()
    weights = g.mean((2, 3), keepdim=True)
    cam = torch.relu((weights * store["a"].detach()).sum(1, keepdim=True))
    return torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("name, layer", [("torchvision:mobilenet_v3_small", "features"),
                                         ("timm:test_resnet", "conv5_x")])
def test_grad_cam_equals_a_hook_based_computation(name, layer, one_thread):
    if name.startswith("timm:") and not HAS_TIMM:
        pytest.skip("timm is not installed: pip install 'cnnlab[timm]'")
    from cnnlab.models import build
    from cnnlab.viz.layers import module_at

    torch.manual_seed(0)
    model = build(name, num_classes=10).eval()
    x = torch.randn(3, 3, 96, 96)
    assert default_layer(model, x) == layer  # at 96 px the last stage still has a map larger than 1×1
    target = torch.tensor([0, 3, 7])
    ours = grad_cam(model, x, target=target)
    reference = _hooked_grad_cam(model, x, target, module_at(model, layer))
    assert reference.abs().max() > 0
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)


def test_guided_backprop_is_exact_with_reused_and_inplace_relus(one_thread):
    """torchvision's ResNet-18 calls each block's one in-place ReLU twice; captum's per-module hooks cannot
    guide that. Ours applies the rule at every call, so it must equal captum on cnnlab's ResNet-18 (one
    ReLU module per use, which captum handles exactly) with the very same weights."""
    import torchvision
    from captum.attr import GuidedBackprop

    from cnnlab.models import build

    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=10).eval()
    ours = build("resnet18", num_classes=10).eval()
    # Same parameters and buffers in the same order: cnnlab's resnet18 is torchvision's, renamed.
    ours.load_state_dict(dict(zip(ours.state_dict(), theirs.state_dict().values())))
    for m in theirs.modules():  # give batch norm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    ours.load_state_dict(dict(zip(ours.state_dict(), theirs.state_dict().values())))
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    target = torch.tensor([2, 5])
    reference = GuidedBackprop(ours).attribute(x.clone().requires_grad_(True), target=target).detach()
    torch.testing.assert_close(guided_backprop(ours, x, target=target), reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(guided_backprop(theirs, x, target=target), reference, rtol=1e-4, atol=1e-6)
    plain = torch.autograd.functional.vjp(lambda v: theirs(v).gather(1, target[:, None]).sum(), x)[1]
    assert not torch.allclose(plain, reference)  # the rule changed something
