"""airbench94 (Jordan 2024) in cnnlab: its network against the published architecture, and each part of its
method (whitening, identity init, BatchNorm rate, schedule, alternating flips, shifts, Lookahead, six-view
TTA) against a hand computation; then the whole recipe resuming exactly."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.config import RECIPES, resolve
from cnnlab.core import transforms
from cnnlab.core.checkpoint import load as load_checkpoint
from cnnlab.core.errors import UserError
from cnnlab.core.metrics import logits, score
from cnnlab.core.spec import Preprocess
from cnnlab.data import open_dataset
from cnnlab.data.loader import TrainBatches
from cnnlab.models import build, transfer
from cnnlab.models.summary import summarize
from cnnlab.train import engine
from cnnlab.train.ema import Lookahead
from cnnlab.train.initialise import (
    WHITEN_EPS,
    dirac_init,
    first_conv,
    patch_moment,
    patches,
    whiten_first_conv,
    whitening_filters,
)


def conv_macs(side_out: int, c_out: int, c_in: int, k: int) -> int:
    return side_out * side_out * c_out * c_in * k * k


def test_the_network_has_airbench94s_layers_and_multiply_accumulates():
    s = summarize("airbench94", num_classes=10)
    shapes = {st["name"]: st["output_size"] for st in s["stages"]}
    # 32 px: the unpadded 2×2 whitening conv leaves 31, each group's pool halves (floor), the last pool takes 3×3.
    assert shapes == {"whiten": [24, 31, 31], "block1": [64, 15, 15], "block2": [256, 7, 7],
                      "block3": [256, 3, 3], "pool": [256], "fc": [10]}
    published = (conv_macs(31, 24, 3, 2)  # whitening
                 + conv_macs(31, 64, 24, 3) + conv_macs(15, 64, 64, 3)  # each group: conv, pool, conv
                 + conv_macs(15, 256, 64, 3) + conv_macs(7, 256, 256, 3)
                 + conv_macs(7, 256, 256, 3) + conv_macs(3, 256, 256, 3)
                 + 256 * 10)
    assert s["macs"] == published == 118_147_360  # "about 0.12 G" per 32-px image
    # Weights: whitening 24·12 + 24 bias; six convs without bias; BatchNorm weight and bias; fc without bias.
    convs = 64 * 24 * 9 + 64 * 64 * 9 + 256 * 64 * 9 + 256 * 256 * 9 * 3
    assert s["params"] == 24 * 12 + 24 + convs + 2 * (2 * 64 + 4 * 256) + 256 * 10


def test_the_network_scales_with_width_and_has_airbenchs_batchnorm_and_output_scale():
    model = build("airbench94", width=16)
    assert [model.block1.conv1.out_channels, model.block2.conv1.out_channels, model.block3.conv2.out_channels] \
        == [16, 64, 64]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6
    for norm in norms:
        # airbench's momentum 0.6 keeps 0.6 of the old statistics: PyTorch's momentum weighs the new batch.
        assert norm.momentum == pytest.approx(0.4) and norm.eps == 1e-12
        assert not norm.weight.requires_grad and norm.bias.requires_grad
    assert model.fc.bias is None and model.whiten[0].bias is not None
    seen = {}
    model.fc.register_forward_hook(lambda m, i, o: seen.setdefault("fc", o))
    out = model.eval()(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out, seen["fc"] / 9)


@pytest.fixture(scope="module")
def sample_inputs():
    data = open_dataset("sample")
    x = data.train_x[:500]
    x = x if isinstance(x, torch.Tensor) else x.read()
    return Preprocess(32, 3, RECIPES["airbench"]["mean"], RECIPES["airbench"]["std"]).to_input(x)


def whitened_moment(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The second moment of the conv's outputs (without bias) over every position of ``x``, in float64."""
    out = F.conv2d(x.double(), conv.weight.double())
    flat = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    return flat.T @ flat / len(flat)


def test_whitening_makes_the_first_convs_outputs_on_training_patches_uncorrelated_with_unit_variance(
        sample_inputs):
    model = build("airbench94", width=8)
    conv = whiten_first_conv(model, sample_inputs)
    assert not conv.weight.requires_grad and bool((conv.bias == 0).all())
    rows = patches(sample_inputs.double(), (2, 2))
    torch.testing.assert_close(patch_moment(sample_inputs, (2, 2), chunk=64), rows.T @ rows / len(rows))
    _, eigenvalues = whitening_filters(rows.T @ rows / len(rows))
    moment = whitened_moment(conv, sample_inputs)
    # Filter i's output has variance λ_i / (λ_i + eps): the eps airbench adds keeps the directions of almost no
    # variance from being amplified without bound. Its negative's is the same, and the two are opposite.
    expected = torch.diag(eigenvalues / (eigenvalues + WHITEN_EPS))
    torch.testing.assert_close(moment[:12, :12], expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(moment[12:, 12:], expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(moment[:12, 12:], -expected, atol=2e-5, rtol=1e-4)
    strong = eigenvalues > 100 * WHITEN_EPS  # where eps is negligible, the identity itself
    assert strong.sum() >= 5  # on the sample: 11.6, 1.25, 0.42, 0.25, 0.090, then 0.049 …
    torch.testing.assert_close(moment[:12, :12][strong][:, strong], torch.eye(int(strong.sum()), dtype=torch.float64),
                               atol=0.011, rtol=0)
    # Without eps, the identity on every whitened channel.
    whiten_first_conv(model, sample_inputs, eps=0.0)
    torch.testing.assert_close(whitened_moment(conv, sample_inputs)[:12, :12], torch.eye(12, dtype=torch.float64),
                               atol=1e-4, rtol=0)


def test_whitening_a_3x3_first_conv_fills_as_many_filter_pairs_as_it_has_room_for(sample_inputs):
    model = build("resnet18-cifar", width=8)
    conv = whiten_first_conv(model, sample_inputs, eps=0.0)
    assert conv is first_conv(model) and conv.weight.shape == (8, 3, 3, 3)
    assert torch.equal(conv.weight[:4], -conv.weight[4:8])  # 8 filters: the 4 largest of 27 directions, ±
    torch.testing.assert_close(whitened_moment(conv, sample_inputs)[:4, :4], torch.eye(4, dtype=torch.float64),
                               atol=1e-4, rtol=0)


def test_dirac_init_makes_each_later_conv_pass_its_first_input_channels_through():
    model = build("airbench94", width=8)
    assert dirac_init(model) == 6
    x = torch.randn(2, 8, 9, 9)
    conv = model.block1.conv2  # 8 → 8
    torch.testing.assert_close(conv(x), x)
    wide = model.block2.conv1  # 8 → 32: the first 8 outputs are the input, the rest keep their init
    out = wide(x)
    torch.testing.assert_close(out[:, :8], x)
    assert out[:, 8:].abs().sum() > 0


def test_norm_lr_scale_gives_batchnorm_its_own_rate_and_the_same_decay_per_step():
    model = build("airbench94", width=8)
    groups = transfer.param_groups(model, 1.5, norm_lr_scale=64.0, weight_decay=0.002)
    assert [g["lr"] for g in groups] == [1.5, 96.0]
    norm_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in norm_biases}  # their scales do not train
    assert groups[1]["weight_decay"] * groups[1]["lr"] == pytest.approx(0.002 * 1.5)
    assert "weight_decay" not in groups[0]  # the optimizer's own
    # Without the scale, as before: one group.
    assert len(transfer.param_groups(model, 1.5)) == 1


def test_the_triangle_schedule_is_airbenchs():
    total = 100
    values = [engine.triangle(i, total) for i in range(total + 1)]
    assert values[0] == pytest.approx(0.2) and values[23] == pytest.approx(1.0) and values[-1] == pytest.approx(0.07)
    assert values[10] == pytest.approx(0.2 + 0.8 * 10 / 23) and values[50] == pytest.approx(1 - 0.93 * 27 / 77)


def flipped_per_image(epoch_batches, originals):
    """For each image (labels are indices), whether it came out mirrored."""
    out = {}
    for x, y, _ in epoch_batches:
        for image, label in zip(x, y.tolist()):
            original = originals[label].float()
            if torch.equal(image, original):
                out[label] = False
            else:
                assert torch.equal(image, original.flip(-1))
                out[label] = True
    return [out[i] for i in range(len(originals))]


def test_alternating_flips_mirror_each_image_on_every_other_epoch():
    n = 64
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    batches = TrainBatches(images, torch.arange(n), 16, Preprocess(8, 3, (0.0,), (1 / 255,)), "flip-crop", seed=7,
                           alternate=True, translate=0)
    flips = [flipped_per_image(batches.epoch(e), images) for e in range(4)]
    assert 16 < sum(flips[0]) < 48  # a random half
    for e in range(3):
        assert all(a != b for a, b in zip(flips[e], flips[e + 1]))  # every image changes side each epoch
    assert flips[0] == flips[2] and flips[1] == flips[3]
    # Random flips do not alternate.
    random = TrainBatches(images, torch.arange(n), 16, Preprocess(8, 3, (0.0,), (1 / 255,)), "flip-crop", seed=7,
                          translate=0)
    r = [flipped_per_image(random.epoch(e), images) for e in range(2)]
    assert any(a == b for a, b in zip(*r))


def test_reflected_shifts_are_f_pad_reflect_then_a_crop():
    x = torch.randint(0, 256, (6, 3, 10, 10), dtype=torch.uint8)
    offsets = torch.randint(0, 5, (6, 2))
    out = transforms.pad_crop(x, offsets, 2, reflect=True)
    padded = F.pad(x.float(), (2, 2, 2, 2), mode="reflect")
    for i, (r, c) in enumerate(offsets.tolist()):
        assert torch.equal(out[i].float(), padded[i, :, r:r + 10, c:c + 10])
    assert out.dtype == torch.uint8
    with pytest.raises(ValueError):
        transforms.pad_crop(x, offsets, 10, reflect=True)


def test_lookahead_equals_a_hand_computation():
    model = nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(1.0)
    every, start, total = 2, 3, 10  # the first blend is at step 4, the first multiple of 2 from step 3
    average = Lookahead(model, every, start, total)
    w = 1.0
    avg = None
    for step in range(1, 10):
        w += step  # what an optimizer step would do
        model.weight.data.fill_(w)
        average.update(step)
        if step < 4:  # following the weights
            avg = w
        elif step == 4:  # the first blend takes the weights
            avg = w
        elif step % every == 0:
            decay = 0.95 ** every * (step / total) ** 3
            avg = decay * avg + (1 - decay) * w
            w = avg  # and the weights continue from the average
        assert average.module.weight.item() == pytest.approx(avg, rel=1e-6), step
        assert model.weight.item() == pytest.approx(w, rel=1e-6), step
    average.end_epoch(9)  # the weights go back to the average at an epoch's end
    assert model.weight.item() == pytest.approx(avg, rel=1e-6) and w != pytest.approx(avg)


class Symmetric(nn.Module):
    """A flip-invariant model: a left-right symmetric conv, global average pool, linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv.weight.data = (self.conv.weight.data + self.conv.weight.data.flip(-1)) / 2
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def shifted(x, down: bool):
    """x moved one pixel (rows and columns), reflecting the edge, built by indexing."""
    n = x.shape[-1]
    index = list(range(1, n)) + [n - 2] if down else [1] + list(range(0, n - 1))
    return x[..., index, :][..., index]


def test_six_view_tta_on_a_flip_invariant_model_weighs_the_shifted_views_a_quarter_each():
    model = Symmetric().eval()
    x = torch.randn(4, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x, True), model(x))  # mirroring changes nothing
        expected = 0.5 * model(x) + 0.25 * model(shifted(x, False)) + 0.25 * model(shifted(x, True))
        torch.testing.assert_close(logits(model, x, "translate"), expected)
        # A model that is not invariant: the six views, each weighed as airbench's tta_level 2 weighs it.
        other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
        other(x)

        def mirrored(v):
            return (other(v) + other(v.flip(-1))) / 2

        six = 0.5 * mirrored(x) + 0.25 * mirrored(shifted(x, False)) + 0.25 * mirrored(shifted(x, True))
        torch.testing.assert_close(logits(other, x, "translate"), six)
    images = torch.randint(0, 256, (6, 3, 9, 9), dtype=torch.uint8)
    prep = Preprocess(9, 3, (0.5,), (0.25,))
    s = score(model, images, torch.zeros(6, dtype=torch.long), prep, tta="translate", features=model.fc)
    with torch.no_grad():
        torch.testing.assert_close(s.logits, logits(model, prep.to_input(images), "translate"))
        # The recorded features are weighed over the six passes as the logits are: the head maps them onto them.
        torch.testing.assert_close(model.fc(s.features), s.logits)


def test_the_recipe_is_airbench94s_hyper_parameters():
    cfg = resolve("airbench")
    assert (cfg.model, cfg.batch_size, cfg.momentum, cfg.nesterov, cfg.label_smoothing) == ("airbench94", 1024, 0.85,
                                                                                           True, 0.2)
    kilostep = 1024 * (1 + 1 / (1 - 0.85))  # airbench's rates are per 1024 images of a summed loss
    assert cfg.lr == pytest.approx(11.5 / kilostep * 1024)
    assert cfg.lr * cfg.weight_decay == pytest.approx(0.0153 * 1024 / kilostep)  # its decay per step
    assert (cfg.norm_lr_scale, cfg.whiten_bias_epochs, cfg.lookahead, cfg.lookahead_from, cfg.translate, cfg.tta) \
        == (64.0, 3, 5, 3, 2, "translate")
    with pytest.raises(UserError, match="`ema` and `lookahead`"):
        resolve("airbench", overrides={"ema": 0.99})


TINY = dict(recipe="airbench", dataset="sample", width=4, epochs=2, batch_size=64, limit_train=640, limit_test=50,
            val_split=64, device="cpu", seed=3, whiten_bias_epochs=1, lookahead=2, lookahead_from=1,
            checkpoint_every=7)


def read_metrics(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Crash(Exception):
    pass


@pytest.mark.parametrize("stop_step", [9, 14])  # the end of epoch 1; mid-epoch 2, after the first blend (10)
def test_the_recipe_resumes_to_the_same_weights(tmp_path, monkeypatch, stop_step):
    whole = engine.train(resolve(overrides={**TINY, "out": str(tmp_path / "whole")})).run_dir
    real = engine.checkpoint.save
    saved = {}

    def save(state, path):
        real(state, path)
        saved[state["step"]] = {k: v.clone() for k, v in state["model"].items()}  # live tensors otherwise
        if path.name == "last.pt" and state["step"] == stop_step:
            raise Crash

    with monkeypatch.context() as m:
        m.setattr(engine.checkpoint, "save", save)
        with pytest.raises(Crash):
            engine.train(resolve(overrides={**TINY, "out": str(tmp_path / "resumed")}))
    engine.train(resume=tmp_path / "resumed")
    a = load_checkpoint(whole / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key in ("model", "train_model"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert read_metrics(whole) == read_metrics(tmp_path / "resumed")
    # The whitening filters never moved; its bias trained in epoch 1 only; weights and average agree at the end.
    assert torch.equal(a["model"]["whiten.0.weight"], saved[0]["whiten.0.weight"])
    assert not torch.equal(saved[9]["whiten.0.bias"], saved[0]["whiten.0.bias"])
    assert torch.equal(a["model"]["whiten.0.bias"], saved[9]["whiten.0.bias"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, a["train_model"][name]), name
