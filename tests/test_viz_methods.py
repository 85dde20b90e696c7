"""The methods of ``cnnlab.viz`` against their definitions, computed here independently."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import run
from cnnlab.data import load_dataset
from cnnlab.data.splits import reported_test_set
from cnnlab.models import build
from cnnlab.viz.attribute import guided_backprop, integrated_gradients, path_integral
from cnnlab.viz.cam import grad_cam, layer_cam
from cnnlab.viz.deconv import deconv
from cnnlab.viz.features import feature_maps
from cnnlab.viz.filters import conv_filters
from cnnlab.viz.inputs import from_test_set
from cnnlab.viz.invert import feature_distance, invert
from cnnlab.viz.maximize import fourier_noise, maximize, objective
from cnnlab.viz.render import minmax, mosaic


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(small_run):
    return run.load(small_run)


@pytest.fixture(scope="module")
def test_images(loaded):
    images, labels = reported_test_set(load_dataset("sample"), loaded.config["limit_test"])
    return images, labels


@pytest.fixture(scope="module")
def x(loaded, test_images):
    # One image of each of four classes (the test set is ordered by class).
    return from_test_set(*test_images, [0, 60, 120, 180], loaded.preprocess).x


def forward_output(model, module, x):
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def test_feature_maps_are_the_layers_forward_output(loaded, x):
    model = loaded.model
    maps = {layer: feature_maps(model, x, layer=layer) for layer in ["conv1", "conv5_x", "layer2.1.left.2"]}
    assert torch.equal(maps["conv1"], forward_output(model, model.conv1, x))
    assert torch.equal(maps["conv5_x"], forward_output(model, model.layer4, x))
    assert torch.equal(maps["layer2.1.left.2"], forward_output(model, model.layer2[1].left[2], x))
    assert maps["conv1"].shape == (4, 8, 32, 32) and maps["conv5_x"].shape == (4, 64, 4, 4)
    assert maps["conv5_x"].abs().sum() > 0


def acts_and_grads(model, layer, x, target):
    """The layer's output and the gradient of each image's target logit with respect to it."""
    seen = []

    def keep(module, inputs, output):
        output.retain_grad()
        seen.append(output)

    handle = layer.register_forward_hook(keep)
    inp = x.clone().requires_grad_(True)
    model(inp).gather(1, target[:, None]).sum().backward()
    handle.remove()
    return seen[0].detach(), seen[0].grad


def test_grad_cam_is_its_definition(loaded, x):
    model = loaded.model
    target = torch.tensor([0, 3, 6, 9])
    acts, grads = acts_and_grads(model, model.layer4, x, target)
    weights = grads.mean((2, 3), keepdim=True)  # α_k: global-average-pooled gradients
    expected = F.interpolate(F.relu((weights * acts).sum(1, keepdim=True)), size=(32, 32), mode="bilinear",
                             align_corners=False)
    got = grad_cam(model, x, target=target, layer="conv5_x")
    assert got.shape == (4, 1, 32, 32)
    assert expected.amax() > 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The predicted class is the default target.
    predicted = model(x).argmax(1)
    torch.testing.assert_close(grad_cam(model, x, target=None), grad_cam(model, x, target=predicted), atol=1e-6, rtol=0)
    # LayerCAM weighs each location by its own positive gradient.
    expected = F.interpolate(F.relu((F.relu(grads) * acts).sum(1, keepdim=True)), size=(32, 32),
                             mode="bilinear", align_corners=False)
    torch.testing.assert_close(layer_cam(model, x, target=target, layer="conv5_x"), expected, atol=1e-5, rtol=0)


def path_scores(model, x, baseline, target, ts):
    """f_c and d f_c/dt at positions ``ts`` of the straight path from ``baseline`` to ``x``, by autograd."""
    scores, slopes = [], []
    for chunk in torch.as_tensor(ts, dtype=x.dtype).split(32):
        p = (baseline[:, None] + chunk.view(1, -1, 1, 1, 1) * (x - baseline)[:, None]).flatten(0, 1)
        p.requires_grad_(True)
        s = model(p).gather(1, target.repeat_interleave(len(chunk))[:, None])[:, 0]
        (g,) = torch.autograd.grad(s.sum(), p)
        scores.append(s.detach().view(len(x), -1))
        slopes.append((g.view(len(x), len(chunk), -1) * (x - baseline).flatten(1)[:, None]).sum(2))
    return torch.cat(scores, 1), torch.cat(slopes, 1)


@pytest.fixture(scope="module")
def relu_net():
    """A ResNet in float64 with seeded random weights and BatchNorm statistics kept away from zero
    variance: piecewise linear with kinks all along the path, the same network on any CPU, and
    rounding far below every tolerance here."""
    torch.manual_seed(0)
    model = build("resnet18-cifar", num_classes=10, width=4).double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return model, x


def test_integrated_gradients_are_complete_to_their_tolerance(relu_net):
    model, x = relu_net
    target = torch.tensor([0, 3, 6, 9])
    result = path_integral(model, x, target=target, tolerance=0.01)
    zero = torch.zeros_like(x)
    # Independently: the score's change, and its total variation along the path (1,000 midpoints).
    ends, _ = path_scores(model, x, zero, target, [0.0, 1.0])
    gain = ends[:, 1] - ends[:, 0]
    _, slopes = path_scores(model, x, zero, target, (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000)
    variation = slopes.abs().mean(1)
    miss = (result.attributions.sum((1, 2, 3)) - gain).abs()
    print(f"integrated gradients: steps {result.steps.tolist()}, gap {result.gap.tolist()}, "
          f"|gain| {gain.abs().tolist()}, variation {variation.tolist()}")
    assert (result.gap < 0.01).all()
    torch.testing.assert_close(result.gap, miss / variation, rtol=0.02, atol=1e-9)  # the gap it reports is the gap
    # Where the score moves one way along the path, variation = |gain|: the plain relative error.
    monotone = variation < 1.02 * gain.abs()
    assert monotone.any()
    assert (miss[monotone] / gain[monotone].abs() < 0.0102).all()
    # The attributions themselves converge: against 1,024 trapezoid intervals.
    dense = path_integral(model, x, target=target, steps=1024, max_steps=1024).attributions
    assert ((result.attributions - dense).flatten(1).norm(dim=1) < 0.05 * dense.flatten(1).norm(dim=1)).all()


def test_integrated_gradients_of_a_linear_model_are_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).double()
    x, baseline = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(1, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([1, 4])
    result = path_integral(model, x, target=target, baseline=baseline, steps=1)
    p = x.clone().requires_grad_(True)
    model(p).gather(1, target[:, None]).sum().backward()
    torch.testing.assert_close(result.attributions, (x - baseline) * p.grad, rtol=1e-12, atol=1e-12)
    assert result.steps.tolist() == [1, 1] and (result.gap < 1e-10).all()


def test_integrated_gradients_say_when_the_step_cap_is_reached(relu_net):
    model, x = relu_net
    with pytest.warns(UserWarning, match=r"after 4 steps"):
        integrated_gradients(model, x[:2], target=0, tolerance=1e-9, steps=2, max_steps=4)
    assert path_integral(model, x[:2], target=0, tolerance=1e-9, steps=2, max_steps=4).steps.tolist() == [4, 4]


def test_integrated_gradients_on_the_trained_model(loaded, x):
    attributions = path_integral(loaded.model, x)
    print(f"integrated gradients on the test run: gap {attributions.gap.tolist()}, steps {attributions.steps.tolist()}")
    assert (attributions.gap < 0.01).all()


class GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients, and only where the input was positive."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0)


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("resnet18-seed", 64), ("resnet18-cifar", 32)])
def test_guided_backprop_rectifies_every_relu(name, size):
    torch.manual_seed(0)
    model = build(name, num_classes=5, width=4).eval()
    x = torch.randn(2, 3, size, size)
    target = torch.tensor([1, 3])
    got = guided_backprop(model, x, target=target)

    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 8 * 2  # the stem, and two in every block: one inside, one after the sum
    for relu in relus:
        relu.forward = GuidedReLU.apply
    inp = x.clone().requires_grad_(True)
    model(inp).gather(1, target[:, None]).sum().backward()
    for relu in relus:
        del relu.forward
    torch.testing.assert_close(got, inp.grad, atol=1e-6, rtol=1e-4)

    # Not the plain gradient, and not guided backprop that skips the ReLUs after the residual sums.
    inp = x.clone().requires_grad_(True)
    model(inp).gather(1, target[:, None]).sum().backward()
    assert (got - inp.grad).abs().max() > 1e-3
    inner = [m.left[2] for m in model.modules() if hasattr(m, "left")] + [model.conv1[2]]
    for relu in inner:
        relu.forward = GuidedReLU.apply
    inp = x.clone().requires_grad_(True)
    model(inp).gather(1, target[:, None]).sum().backward()
    for relu in inner:
        del relu.forward
    assert (got - inp.grad).abs().max() > 1e-4


def noise_input(loaded, n):
    """lucid's starting images, as network input."""
    pre = loaded.preprocess
    return pre.normalizer()(fourier_noise((n, pre.channels, pre.size, pre.size)))


def test_channel_maximisation_raises_the_channel_fivefold(loaded):
    model, layer, channels = loaded.model, "conv5_x", [0, 1, 2, 3]
    picks = torch.tensor(channels)
    noise = noise_input(loaded, len(channels))
    start = maximize(model, noise, layer=layer, channels=channels, preprocess=loaded.preprocess, steps=0)
    end = maximize(model, noise, layer=layer, channels=channels, preprocess=loaded.preprocess)
    with torch.no_grad():
        before = objective(model, start, layer=layer, channels=picks)
        after = objective(model, end, layer=layer, channels=picks)
    print(f"channel maximisation: {before.tolist()} -> {after.tolist()}, ratio {(after / before).tolist()}")
    assert (before > 0).all()
    assert (after >= 5 * before).all()


def test_class_maximisation_is_confident(loaded, test_images):
    model = loaded.model
    # A model trained for a few steps has only learned some classes; take the one it predicts most.
    x = from_test_set(*test_images, range(200), loaded.preprocess).x
    with torch.no_grad():
        target = int(torch.bincount(model(x).argmax(1), minlength=10).argmax())
    noise = noise_input(loaded, 1)
    start = maximize(model, noise, target=[target], preprocess=loaded.preprocess, steps=0)
    end = maximize(model, noise, target=[target], preprocess=loaded.preprocess)
    with torch.no_grad():
        before, after = model(start).softmax(1)[0, target], model(end).softmax(1)[0, target]
    print(f"class maximisation of {loaded.classes[target]}: softmax {before:.3f} -> {after:.3f}")
    assert after >= 0.9 and before < 0.5


def test_inversion_matches_the_conv2_x_representation(loaded, x):
    model = loaded.model
    x0 = x[:2]
    recon = invert(model, x0, layer="conv2_x", preprocess=loaded.preprocess)
    distance = feature_distance(model, recon, x0, "conv2_x")
    start = feature_distance(model, invert(model, x0, layer="conv2_x", preprocess=loaded.preprocess, steps=0), x0,
                             "conv2_x")
    print(f"inversion at conv2_x: relative feature distance {start.tolist()} -> {distance.tolist()}")
    assert (distance < 0.2).all() and (start > 0.5).all()
    # The reconstruction is an image in range, not the original copied.
    pixels = recon * torch.tensor(loaded.preprocess.std).view(1, 3, 1, 1) + torch.tensor(loaded.preprocess.mean).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert (recon - x0).abs().mean() > 1e-3


def test_conv1_filter_grid_has_every_filter_min_max_scaled():
    model = build("resnet18", num_classes=10)
    path, weight = conv_filters(model, "conv1")
    assert path == "conv1.0" and weight.shape == (64, 3, 7, 7)
    tiles = minmax(weight)
    assert tiles.shape == (64, 3, 7, 7)
    for w, tile in zip(weight, tiles):
        torch.testing.assert_close(tile, (w - w.min()) / (w.max() - w.min()))
        assert tile.min() == 0 and tile.max() == 1
    grid, cols = mosaic(tiles.permute(0, 2, 3, 1).numpy(), pad=1)
    assert cols == 8 and grid.shape == (8 * (7 + 1) + 1, 8 * (7 + 1) + 1, 3)
    for i in range(64):
        r, c = divmod(i, 8)
        placed = grid[1 + r * 8: 1 + r * 8 + 7, 1 + c * 8: 1 + c * 8 + 7]
        assert (placed == tiles[i].permute(1, 2, 0).numpy()).all()


@pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU")
def test_deconv_keeps_positive_signals_and_follows_zeiler_fergus(loaded, x):
    from captum.attr import NeuronDeconvolution

    model = loaded.model
    maps = feature_maps(model, x[:1], layer="conv5_x")[0]
    channel = int(maps.flatten(1).amax(1).argmax())
    got = deconv(model, x[:1], layer="conv5_x", channels=channel)
    acts = maps[channel]
    i, j = divmod(int(acts.argmax()), acts.shape[1])
    expected = NeuronDeconvolution(model, model.layer4).attribute(x[:1].clone().requires_grad_(True),
                                                                  (channel, i, j))
    torch.testing.assert_close(got, acts.max() * expected.detach(), atol=1e-5, rtol=1e-4)
    assert got.abs().sum() > 0
