"""cnnlab's models against the papers (Table 1 and Table 6 of He et al. 2015, torchvision's counts), the
counted summary, and the torchvision and timm models built by name."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.core.errors import UserError
from cnnlab.models import (
    MODELS,
    NATIVE_IMAGE_SIZE,
    TABLE1_LAYERS,
    ResNet,
    build,
    feature_blocks,
    head_path,
    stage_paths,
)
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


@pytest.mark.parametrize("name", list(MODELS))
def test_every_relu_is_its_own_module(name):
    model = build(name, width=4).eval()
    all_modules = [m for _, m in model.named_modules(remove_duplicate=False)]
    assert len({id(m) for m in all_modules}) == len(all_modules)

    relus = [m for m in all_modules if isinstance(m, nn.ReLU)]
    if not relus:  # airbench94 activates with GELUs, which the ReLU rules of guided backprop leave alone
        assert name == "airbench94" and sum(isinstance(m, nn.GELU) for m in all_modules) == 7
        return
    if name in NAMES:
        assert len(relus) == 17  # stem + 2 per block × 8 blocks
    assert not any(m.inplace for m in relus)
    calls = {id(m): 0 for m in relus}
    handles = [m.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls[id(m)] + 1)) for m in relus]
    size = 32 if NATIVE_IMAGE_SIZE[name] == 32 else 64
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
    assert message.startswith("unknown model 'nope'; choose one of: resnet18, resnet34, ")
    assert message.endswith("torchvision:NAME or timm:NAME")
    for bad in ({"width": 0}, {"num_classes": 0}, {"in_channels": -1}):
        with pytest.raises(UserError):
            build("resnet18", **bad)
    with pytest.raises(UserError):
        summarize("nope")


# He et al. 2015, Table 1, the FLOPs row (multiply-adds, ×10⁹, at 224 px), and torchvision's constructors.
TABLE1_FLOPS = {"resnet18": 1.8, "resnet34": 3.6, "resnet50": 3.8, "resnet101": 7.6, "resnet152": 11.3}
# He et al. 2015, Table 6: parameters of the CIFAR-10 ResNets (millions, as printed).
TABLE6_PARAMS = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85, "resnet110": 1.7}


@pytest.mark.parametrize("name", list(TABLE1_FLOPS))
def test_table1_flops_row_and_torchvision_params(name):
    summary = summarize(name, num_classes=1000)  # counted on the meta device: no memory, no arithmetic
    assert summary["image_size"] == 224
    # Table 1 gives two significant figures; the counted multiply-adds (fc included) are within 2%.
    assert summary["macs"] / 1e9 == pytest.approx(TABLE1_FLOPS[name], rel=0.02)
    with torch.device("meta"):
        theirs = getattr(torchvision.models, name)(weights=None, num_classes=1000)
    assert summary["params"] == n_params(theirs)
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert summary["stages"][5]["output_size"] == [512 * (4 if name in ("resnet50", "resnet101", "resnet152") else 1),
                                                   1, 1]


@pytest.mark.parametrize("name, paper", [("vgg11", "vgg11_bn"), ("vgg16", "vgg16_bn"), ("alexnet", "alexnet")])
def test_classic_nets_equal_torchvision(name, paper):
    with torch.device("meta"):
        theirs = getattr(torchvision.models, paper)(weights=None, num_classes=1000)
    assert summarize(name, num_classes=1000)["params"] == n_params(theirs)


def test_table6_params():
    for name, millions in TABLE6_PARAMS.items():
        params = summarize(name, num_classes=10)["params"]
        assert round(params / 1e6, 2 if millions < 1 else 1) == millions, name
        plain = name.replace("resnet", "plain")
        if plain in MODELS:  # option A shortcuts add no parameters: the plain net has exactly as many
            assert summarize(plain, num_classes=10)["params"] == params


def test_cifar_nets_match_section_4_2():
    model = build("resnet56")
    shapes = module_outputs(model, 32, ["conv1", "layer1", "layer2", "layer3", "avgpool"])
    assert shapes == {"conv1": [16, 32, 32], "layer1": [16, 32, 32], "layer2": [32, 16, 16],
                      "layer3": [64, 8, 8], "avgpool": [64, 1, 1]}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 56  # 6n+2 weighted layers: the convolutions and fc, no projection shortcuts
    block = model.layer2[0]
    assert type(block.shortcut).__name__ == "ShortcutA" and not list(block.shortcut.parameters())
    assert build("plain56").layer2[0].shortcut is None
    x = torch.randn(2, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2]) and not out[:, :8].any() and not out[:, 24:].any()


def test_plain_nets_have_no_shortcuts():
    for name in ("plain18", "plain34"):
        model = build(name, width=4)
        assert all(b.shortcut is None for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
                   for b in stage)
    assert n_params(build("plain18", num_classes=1000)) == \
        n_params(build("resnet18", num_classes=1000)) - sum(
            n_params(b.shortcut) for s in (build("resnet18").layer2, build("resnet18").layer3,
                                           build("resnet18").layer4)
            for b in s if isinstance(b.shortcut, nn.Sequential))


# The last spatial feature block (the default layer of the CAMs), found from each model.
FEATURE_BLOCKS = {"resnet18": "layer4", "resnet20": "layer3", "plain56": "layer3", "resnet50": "layer4",
                  "vgg16-cifar": "conv5", "alexnet": "conv5", "torchvision:mobilenet_v3_small": "features",
                  "torchvision:resnet18": "layer4", "timm:test_resnet": "layer4", "timm:test_efficientnet": "bn2"}


@pytest.mark.parametrize("name", list(FEATURE_BLOCKS))
def test_feature_block_is_found(name):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    external = name not in MODELS
    model = build(name, width=None if external else 4, in_channels=1)
    size = 64 if external or NATIVE_IMAGE_SIZE[name] > 32 else 32
    found = feature_blocks(model, torch.zeros(1, 1, size, size))
    assert found.last == FEATURE_BLOCKS[name]
    assert found.shapes[found.last][-1] > 1
    assert model(torch.zeros(2, 1, size, size)).shape == (2, 10)
    assert head_path(model) is not None


def test_external_models_by_name():
    model = build("torchvision:mobilenet_v3_small", num_classes=7, in_channels=1)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 7)
    assert head_path(model) == "classifier.3"
    assert stage_paths(build("torchvision:resnet18"))["conv5_x"] == "layer4"
    with pytest.raises(UserError, match="torchvision has no classification model 'resnet9'"):
        build("torchvision:resnet9")
    with pytest.raises(UserError, match="has its own widths"):
        build("torchvision:resnet18", width=16)
    summary = summarize("torchvision:mobilenet_v3_small", image_size=32, num_classes=10)
    assert summary["width"] is None
    theirs = torchvision.models.mobilenet_v3_small(num_classes=10)
    assert summary["params"] == n_params(theirs)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        theirs.eval()(torch.zeros(1, 3, 32, 32))
    assert summary["macs"] == counter.get_total_flops() // 2
    if importlib.util.find_spec("timm"):
        assert build("timm:test_resnet", num_classes=3, in_channels=1)(torch.zeros(2, 1, 64, 64)).shape == (2, 3)
        with pytest.raises(UserError, match="timm has no model"):
            build("timm:no_such_net")


def test_models_command_lists_every_family(capsys):
    from cnnlab import cli

    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list(MODELS) + ["torchvision:NAME", "timm:NAME"]:
        assert name in out
    assert cli.main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    entries = listed["models"]
    assert [e["name"] for e in entries] == list(MODELS)
    assert {e["family"] for e in entries} == {"resnet", "plain", "cifar-resnet", "cifar-plain", "alexnet", "vgg",
                                              "airbench"}
    for e in entries:
        assert e["params"] > 0 and e["macs"] > 0 and e["image_size"] in (32, 224)
    assert "mobilenet_v3_small" in listed["torchvision"] and "resnet18" in listed["torchvision"]
