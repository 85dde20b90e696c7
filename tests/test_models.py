"""The three ResNet-18 variants against Table 1 of He et al. 2015, and the counted summary."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.core.errors import UserError
from cnnlab.models import MODELS, NATIVE_IMAGE_SIZE, TABLE1_LAYERS, ResNet, build
from cnnlab.models.summary import format_table, summarize

NAMES = ["resnet18", "resnet18-seed", "resnet18-cifar"]
STAGES = ["conv1", "conv2_x", "conv3_x", "conv4_x", "conv5_x", "pool", "fc"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def module_outputs(model: nn.Module, image_size: int, names: list[str]) -> dict[str, list[int]]:
    """Output shape (without batch) of each named module on one zero image."""
    shapes: dict[str, list[int]] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, list(o.shape[1:])))
        for name in names
    ]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for h in handles:
        h.remove()
    return shapes


def test_resnet18_matches_table1_at_224():
    shapes = module_outputs(build("resnet18", width=64), 224, list(TABLE1_LAYERS.values()))
    assert shapes == {
        "conv1": [64, 112, 112],
        "layer1": [64, 56, 56],
        "layer2": [128, 28, 28],
        "layer3": [256, 14, 14],
        "layer4": [512, 7, 7],
        "avgpool": [512, 1, 1],
        "fc": [10],
    }


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_resnet18_params_equal_torchvision(num_classes):
    ours = build("resnet18", num_classes=num_classes)
    theirs = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    assert n_params(ours) == n_params(theirs)
    assert summarize("resnet18", num_classes=num_classes)["params"] == n_params(theirs)


def test_resnet18_macs_at_224():
    assert summarize("resnet18")["macs"] == pytest.approx(1.814e9, rel=0.01)


def test_seed_pools_after_layer1():
    model = build("resnet18-seed", width=16)
    assert module_outputs(model, 224, ["layer1"])["layer1"] == [16, 112, 112]
    assert summarize("resnet18-seed")["macs"] == pytest.approx(3.20e9, rel=0.01)
    conv2_x = summarize("resnet18-seed", width=16)["stages"][1]
    assert conv2_x["output_size"] == [16, 56, 56]
    assert "after" in conv2_x["layers"] and "max pool" in conv2_x["layers"]


def test_cifar_keeps_resolution():
    shapes = module_outputs(build("resnet18-cifar"), 32, ["conv1", "layer4"])
    assert shapes == {"conv1": [64, 32, 32], "layer4": [512, 4, 4]}
    assert isinstance(build("resnet18-cifar").maxpool, nn.Identity)


@pytest.mark.parametrize("name", NAMES)
def test_summary_json_and_counts(name):
    summary = summarize(name, width=16, num_classes=10)
    summary = json.loads(json.dumps(summary))
    assert set(summary) == {"model", "image_size", "num_classes", "width", "params", "macs", "stages"}
    assert summary["image_size"] == NATIVE_IMAGE_SIZE[name]
    assert [s["name"] for s in summary["stages"]] == STAGES
    for stage in summary["stages"]:
        assert set(stage) == {"name", "output_size", "layers", "params", "macs"}
        assert isinstance(stage["layers"], str) and stage["layers"]
    assert summary["stages"][-1]["output_size"] == [10]
    assert summary["stages"][-2]["output_size"] == [128, 1, 1]

    model = build(name, num_classes=10, width=16)
    assert sum(s["params"] for s in summary["stages"]) == summary["params"] == n_params(model)
    assert sum(s["macs"] for s in summary["stages"]) == summary["macs"]

    size = summary["image_size"]
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    assert summary["macs"] == counter.get_total_flops() // 2

    table = format_table(summary)
    assert all(stage in table for stage in STAGES) and f"{summary['macs']:,}" in table


def test_summary_table1_text():
    layers = {s["name"]: s["layers"] for s in summarize("resnet18", width=16)["stages"]}
    assert layers["conv1"] == "7×7, 16, stride 2"
    assert layers["conv2_x"] == "3×3 max pool, stride 2; [3×3, 16; 3×3, 16] × 2"
    assert layers["conv5_x"] == "[3×3, 128; 3×3, 128] × 2"


def test_summary_rejects_too_small_images():
    with pytest.raises(UserError, match="too small.*at least 17 px"):
        summarize("resnet18", image_size=16, width=8)
    summarize("resnet18", image_size=17, width=8)
    with pytest.raises(UserError, match="at least 5 px"):
        summarize("resnet18-cifar", image_size=4, width=8)
    with pytest.raises(UserError):
        summarize("resnet18", image_size=0, width=8)


class CountRelu(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.inplace = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.relu.default:
            self.calls += 1
        if func is torch.ops.aten.relu_.default:
            self.inplace += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", NAMES)
def test_every_relu_is_its_own_module(name):
    model = build(name, width=16).eval()
    all_modules = [m for _, m in model.named_modules(remove_duplicate=False)]
    assert len({id(m) for m in all_modules}) == len(all_modules)

    relus = [m for m in all_modules if isinstance(m, nn.ReLU)]
    assert len(relus) == 17  # stem + 2 per block × 8 blocks
    assert not any(m.inplace for m in relus)
    calls = {id(m): 0 for m in relus}
    handles = [m.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls[id(m)] + 1)) for m in relus]
    size = NATIVE_IMAGE_SIZE[name] // 2
    with torch.no_grad(), CountRelu() as counter:
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    assert set(calls.values()) == {1}
    assert counter.calls == len(relus)
    assert counter.inplace == 0


def test_width_scaling():
    model = build("resnet18", width=16)
    assert model.conv1[0].out_channels == 16
    assert model.fc.in_features == 128
    assert model.layer4[1].left[3].out_channels == 128


def test_module_paths_and_variant_flags():
    for name in NAMES:
        model = build(name, width=8, in_channels=1)
        assert isinstance(model, ResNet)
        paths = dict(model.named_modules())
        assert isinstance(paths["layer4.1.left.3"], nn.Conv2d)
        assert isinstance(paths["layer2.0.shortcut.0"], nn.Conv2d)
        assert isinstance(paths["layer1.0.shortcut"], nn.Identity)
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert build("resnet18-seed").pool_after_layer1 and not build("resnet18").pool_after_layer1
    assert build("resnet18-cifar").stem == "cifar"


def test_build_errors():
    with pytest.raises(UserError) as info:
        build("nope")
    message = str(info.value)
    assert "'nope'" in message and all(name in message for name in MODELS)
    assert message == "unknown model 'nope'; choose one of: resnet18, resnet18-seed, resnet18-cifar"
    for bad in ({"width": 0}, {"num_classes": 0}, {"in_channels": -1}):
        with pytest.raises(UserError):
            build("resnet18", **bad)
    with pytest.raises(UserError):
        summarize("nope")
