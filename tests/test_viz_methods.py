"""The methods of ``cnnlab.viz`` against their definitions, computed here independently."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import run
from cnnlab.data import load_dataset
from cnnlab.data.splits import reported_test_set
from cnnlab.models import build
from cnnlab.visualize.render import minmax, mosaic
from cnnlab.viz.attribute import (
    guided_backprop,
    guided_grad_cam,
    integrated_gradients,
    occlusion,
    path_integral,
    smoothgrad,
)
from cnnlab.viz.cam import grad_cam, grad_cam_pp, layer_cam, score_cam
from cnnlab.viz.deconv import deconv
from cnnlab.viz.features import feature_maps
from cnnlab.viz.filters import conv_filters
from cnnlab.viz.inputs import from_test_set
from cnnlab.viz.invert import feature_distance, invert
from cnnlab.viz.maximize import fourier_noise, maximize, objective

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(small_run):
    return run.load(small_run)


@pytest.fixture(scope="module")
def test_images(loaded):
    images, labels = reported_test_set(load_dataset("sample"), loaded.config.limit_test)
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
    pixels = (recon * torch.tensor(loaded.preprocess.std).view(1, 3, 1, 1)
              + torch.tensor(loaded.preprocess.mean).view(1, 3, 1, 1))
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


# --- CAMs, attributions, DeepDream and receptive fields against computations written here ---------------


def tiny_cnn(seed=0, circular=False):
    """conv → ReLU → conv → ReLU (module "3", the layer explained) → 1×1 conv → ReLU → mean → linear,
    float64 with seeded weights: every quantity below is cheap to compute by its definition, and the
    head after the layer is piecewise linear, as Grad-CAM++'s closed form assumes."""
    torch.manual_seed(seed)
    pad = dict(padding=1, padding_mode="circular" if circular else "zeros")
    return nn.Sequential(nn.Conv2d(3, 4, 3, **pad), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, **pad), nn.ReLU(),
                         nn.Conv2d(5, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 3)).double().eval()


def tiny_input(n=2, side=8, seed=1):
    return torch.randn(n, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_grad_cam_pp_is_equation_19_with_the_derivatives_of_exp_score():
    """Chattopadhay et al., Eq. 19 for Y = exp(S_c): α = ∂²Y / (2 ∂²Y + Σ_ab A_ab ∂³Y) per element, with the
    second and third derivatives taken by autograd, weights w_k = Σ_ij α_ij ReLU(∂Y/∂A_ij). cnnlab drops the
    common factor exp(S_c) of the weights (maps are drawn to their own range), so its map is this / Y."""
    from torch.func import grad, jvp, vmap

    model, x, target = tiny_cnn(), tiny_input(), torch.tensor([0, 2])
    head, tail = model[:4], model[4:]
    expected = []
    for i in range(len(x)):
        a = head(x[i:i + 1]).detach()

        def y(acts, c=int(target[i])):
            return tail(acts)[0, c].exp()

        basis = torch.eye(a.numel(), dtype=a.dtype).view(-1, *a.shape)
        d1 = grad(y)(a)

        def second(v, at=a, y=y):  # H v
            return jvp(grad(y), (at,), (v,))[1]

        d2 = vmap(second)(basis).flatten(1).diagonal().view(a.shape)
        d3 = vmap(lambda v, a=a, y=y: jvp(lambda at: jvp(grad(y), (at,), (v,))[1], (a,), (v,))[1])(basis)
        d3 = d3.flatten(1).diagonal().view(a.shape)
        denominator = 2 * d2 + a.sum((2, 3), keepdim=True) * d3
        alpha = torch.where(d2 != 0, d2 / torch.where(denominator != 0, denominator, 1.0), 0.0)
        weights = (alpha * d1.clamp(min=0)).sum((2, 3), keepdim=True)
        cam = (weights * a).sum(1, keepdim=True).clamp(min=0) / y(a)
        expected.append(F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False))
    expected = torch.cat(expected)
    assert expected.amax() > 0
    torch.testing.assert_close(grad_cam_pp(model, x, target=target, layer="3"), expected, rtol=1e-10, atol=1e-12)


def score_cam_by_definition(model, x, target, head):
    """Wang et al. 2020, Algorithm 1, one channel at a time: S_k = f_c(X ∘ H_k) − f_c(X_b) with H_k the channel
    upsampled and min–max scaled and X_b = 0, α = softmax_k(S_k), map = ReLU(Σ_k α_k A_k) upsampled."""
    out = []
    for i in range(len(x)):
        xi, c = x[i:i + 1], int(target[i])
        acts = head(xi)
        scores = []
        for k in range(acts.shape[1]):
            h = F.interpolate(acts[:, k:k + 1], size=x.shape[-2:], mode="bilinear", align_corners=False)
            h = (h - h.min()) / (h.max() - h.min()) if h.max() > h.min() else torch.zeros_like(h)
            scores.append(model(xi * h)[0, c] - model(torch.zeros_like(xi))[0, c])
        alpha = torch.stack(scores).softmax(0)
        cam = (alpha.view(1, -1, 1, 1) * acts).sum(1, keepdim=True).clamp(min=0)
        out.append(F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False))
    return torch.cat(out)


def test_score_cam_is_algorithm_1_of_wang_et_al():
    model, x, target = tiny_cnn(), tiny_input(), torch.tensor([1, 2])
    with torch.no_grad():
        expected = score_cam_by_definition(model, x, target, model[:4])
    torch.testing.assert_close(score_cam(model, x, target=target, layer="3"), expected, rtol=1e-10, atol=1e-12)


def test_score_cam_on_a_model_worked_out_by_hand():
    """One input channel x = [[1, −1], [2, 0]]; the layer is (ReLU(x), ReLU(−x)) = A₀ = [[1, 0], [2, 0]],
    A₁ = [[0, 1], [0, 0]]; masks H₀ = A₀ / 2, H₁ = A₁. The head averages each channel and maps (m₀, m₁) to
    logits (m₀ − m₁, −m₀ + 2 m₁). X ∘ H₀ = [[.5, 0], [2, 0]] gives (m₀, m₁) = (.625, 0), logits (.625, −.625);
    X ∘ H₁ = [[0, −1], [0, 0]] gives (0, .25), logits (−.25, .5). The zero image scores 0."""
    import math

    conv = nn.Conv2d(1, 2, 1, bias=False)
    fc = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        fc.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 2.0]]))
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).double().eval()
    x = torch.tensor([[1.0, -1.0], [2.0, 0.0]], dtype=torch.float64).view(1, 1, 2, 2)
    for target, (s0, s1) in ((0, (0.625, -0.25)), (1, (-0.625, 0.5))):
        a0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
        expected = torch.tensor([[a0, 1 - a0], [2 * a0, 0.0]], dtype=torch.float64).view(1, 1, 2, 2)
        torch.testing.assert_close(score_cam(model, x, target=target, layer="1"), expected, rtol=1e-12, atol=1e-14)


def test_score_cam_maps_of_the_predicted_and_the_least_likely_class_differ():
    """Two blobs, each the evidence for one class: the weak one (value 1, left) for class 0, the strong one (value
    3, right) for class 1, which is predicted. Each class's map must point at its own blob. Before the fix the
    channel weights differed by at most a factor of e < 3, so both maps pointed at the strong blob."""
    conv = nn.Conv2d(1, 2, 1, bias=False)
    fc = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))  # channel 0 sees the left blob, 1 the right
        fc.weight.copy_(16 * torch.eye(2))
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).double().eval()
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    x[..., 2:6, 0:4], x[..., 2:6, 4:8] = 1.0, -3.0
    logits = model(x)[0]
    assert logits.argmax() == 1 and logits.argmin() == 0
    predicted, least = score_cam(model, x, target=1, layer="1")[0, 0], score_cam(model, x, target=0, layer="1")[0, 0]
    assert divmod(int(predicted.argmax()), 8)[1] >= 4 and divmod(int(least.argmax()), 8)[1] < 4
    assert pearson(predicted, least) < 0


def pearson(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_smoothgrad_is_the_mean_gradient_magnitude_under_noise_scaled_per_image(relu_net):
    """Smilkov et al., Sec. 3: σ = noise level × (x_max − x_min) of each image; the noise of each image drawn
    as the docstring says, so that it can be reproduced here."""
    model, x = relu_net
    x = x[:2] * torch.tensor([1.0, 10.0], dtype=x.dtype).view(2, 1, 1, 1)  # two very different ranges
    target, samples, noise = torch.tensor([3, 7]), 5, 0.2
    expected = []
    for i in range(len(x)):
        sigma = noise * (x[i].max() - x[i].min())
        eps = torch.randn((samples, *x.shape[1:]), generator=torch.Generator().manual_seed(4), dtype=x.dtype)
        p = (x[i] + sigma * eps).requires_grad_(True)
        model(p)[:, target[i]].sum().backward()
        expected.append(p.grad.abs().mean(0))
    got = smoothgrad(model, x, target=target, samples=samples, noise=noise, seed=4, batch_size=3)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-10, atol=1e-14)


def test_smoothgrad_of_an_image_does_not_depend_on_its_batch(relu_net):
    model, x = relu_net
    state = torch.random.get_rng_state()
    together = smoothgrad(model, x, target=[1, 2, 3, 4], samples=4)
    for i in range(len(x)):
        torch.testing.assert_close(smoothgrad(model, x[i:i + 1], target=[i + 1], samples=4), together[i:i + 1],
                                   rtol=1e-10, atol=1e-14)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone


def test_occlusion_is_the_mean_score_drop_of_the_windows_over_each_pixel():
    """Zeiler & Fergus, Sec. 4.2, as captum averages it: each window of w × w pixels at stride s is set to 0 in
    every channel, and each pixel gets the mean drop of the target score over the windows that cover it."""
    model, x, target = tiny_cnn(), tiny_input(side=8), torch.tensor([0, 1])
    window, stride = 4, 2
    drop_sum, covered = torch.zeros_like(x[:, :1]), torch.zeros_like(x[:, :1])
    with torch.no_grad():
        full = model(x).gather(1, target[:, None])[:, 0]
        for top in range(0, 8 - window + 1, stride):
            for left in range(0, 8 - window + 1, stride):
                hidden = x.clone()
                hidden[:, :, top:top + window, left:left + window] = 0
                drop = full - model(hidden).gather(1, target[:, None])[:, 0]
                drop_sum[:, :, top:top + window, left:left + window] += drop.view(-1, 1, 1, 1)
                covered[:, :, top:top + window, left:left + window] += 1
    expected = (drop_sum / covered).expand_as(x)
    got = occlusion(model, x, target=target, window=window, stride=stride)
    assert got.dtype == x.dtype
    # captum divides the summed drops, rounded to float32, by the window count in float32: two roundings of
    # each value, so a relative error of at most 2 × 2⁻²⁴ (doubled here for the float64 sums' own rounding).
    torch.testing.assert_close(got, expected, rtol=4 * 2.0 ** -24, atol=1e-300)


@pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU")
def test_guided_grad_cam_is_guided_backprop_times_upsampled_grad_cam(relu_net):
    model, x = relu_net
    x, target = x[:2], torch.tensor([2, 5])
    acts, grads = acts_and_grads(model, model.layer3, x, target)
    cam = F.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    for relu in relus:
        relu.forward = GuidedReLU.apply
    try:
        inp = x.clone().requires_grad_(True)
        model(inp).gather(1, target[:, None]).sum().backward()
    finally:
        for relu in relus:
            del relu.forward
    expected = inp.grad * cam
    assert expected.abs().amax() > 0
    got = guided_grad_cam(model, x, target=target, layer="conv4_x")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().amax()))


def dream_step(model, layer_module, u, step_size):
    """One DeepDream step by its definition: gradient ascent on ½‖A‖², normalised by the mean |gradient|."""
    seen = []
    handle = layer_module.register_forward_hook(lambda m, i, o: seen.append(o))
    u = u.clone().requires_grad_(True)
    model(u)
    handle.remove()
    (g,) = torch.autograd.grad(seen[0].pow(2).sum() / 2, u)
    return (u + step_size * g / g.abs().mean((1, 2, 3), keepdim=True)).clamp(0, 1).detach()


def test_dream_is_normalised_gradient_ascent_over_octaves():
    """Mordvintsev et al.'s octaves: dream at a smaller scale first, then add the detail found, enlarged, to
    the image at the next scale and dream on (here without jitter; the next test covers it)."""
    from cnnlab.viz.dream import dream

    model = tiny_cnn()
    pixels = torch.rand(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = dream(model, pixels, layer="3", steps=2, octaves=2, octave_scale=1.5, step_size=0.05, jitter=0)
    small = F.interpolate(pixels, size=(8, 8), mode="bilinear", align_corners=False)  # round(12 / 1.5)
    u = small
    for _ in range(2):
        u = dream_step(model, model[3], u, 0.05)
    u = pixels + F.interpolate(u - small, size=(12, 12), mode="bilinear", align_corners=False)
    for _ in range(2):
        u = dream_step(model, model[3], u, 0.05)
    torch.testing.assert_close(got, u, rtol=1e-10, atol=1e-12)
    assert (got - pixels).abs().amax() > 0.01


def test_dream_jitter_is_undone_after_each_step():
    """On a network that is equivariant to circular shifts, jitter changes nothing: every shift is rolled back."""
    from cnnlab.viz.dream import dream

    model = tiny_cnn(circular=True)
    model[2].stride = (1, 1)  # a stride would break the equivariance for odd shifts
    pixels = torch.rand(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    plain = dream(model, pixels, layer="3", steps=3, octaves=1, jitter=0)
    jittered = dream(model, pixels, layer="3", steps=3, octaves=1, jitter=3, seed=7)
    torch.testing.assert_close(jittered, plain, rtol=1e-10, atol=1e-12)


def test_top_images_rank_by_the_channel_maximum_and_box_the_receptive_field():
    """Two 3×3 convolutions of ones without padding: a unit at (i, j) sees input rows i … i+4 and columns
    j … j+4 with gradient [1, 2, 3, 2, 1] ⊗ [1, 2, 3, 2, 1], whose smallest entry is 1/9 ≥ 10% of the largest,
    so its effective receptive field is that whole 5 × 5 square. A single bright pixel at (r, c) excites the
    unit centred on it most, at 9 × its value."""
    from cnnlab.core.spec import Preprocess
    from cnnlab.viz.top_images import top_images

    model = nn.Sequential(nn.Conv2d(1, 1, 3, bias=False), nn.Conv2d(1, 1, 3, bias=False))
    for conv in model:
        nn.init.ones_(conv.weight)
    spots = [(5, 7, 60), (3, 3, 250), (10, 4, 120), (8, 11, 200), (2, 12, 30)]  # (row, column, value)
    images = torch.zeros(len(spots), 1, 16, 16, dtype=torch.uint8)
    for k, (r, c, v) in enumerate(spots):
        images[k, 0, r, c] = v
    pre = Preprocess(16, 1, (0.0,), (1.0,))
    top = top_images(model, images, pre, layer="1", channel=0, count=3)
    ranked = sorted(range(len(spots)), key=lambda k: -spots[k][2])[:3]
    assert top.indices.tolist() == ranked
    torch.testing.assert_close(top.scores, torch.tensor([9 * spots[k][2] / 255 for k in ranked]))
    assert top.boxes == [(spots[k][0] - 2, spots[k][1] - 2, spots[k][0] + 3, spots[k][1] + 3) for k in ranked]
    assert top.maps.shape == (3, 12, 12)
