"""Every method of ``cnnlab.viz`` is called the same way: ``method(model, x, *, target, layer, channels, **options)``.

One seeded network and one batch for all of them; each method is checked for what it returns, for
depending on every parameter it uses, for its defaults, and for refusing the parameters it has no
use for. The methods' own definitions are tested in test_viz_methods.py.
"""

import pytest
import torch
from torch import nn

from cnnlab.core.spec import Preprocess
from cnnlab.inspect.registry import TECHNIQUES
from cnnlab.models import build
from cnnlab.viz.cam import grad_cam
from cnnlab.viz.deconv import deconv
from cnnlab.viz.features import feature_maps
from cnnlab.viz.maximize import fourier_noise, maximize
from cnnlab.viz.shape import PARAMETERS

pytestmark = pytest.mark.usefixtures("one_thread")

PRE = Preprocess(32, 3, (0.5, 0.45, 0.4), (0.25, 0.2, 0.3))
# Two values of each parameter, one per image of the batch of two.
VALUES = {"target": ([0, 1], [5, 8]), "layer": ("conv4_x", "conv5_x"), "channels": ([0, 1], [2, 3])}
MAP, IMAGE = (2, 1, 32, 32), (2, 3, 32, 32)
# Fewer steps and samples than even the registry's quick options: these tests check shapes and wiring.
FASTER = {"integrated-gradients": dict(steps=4, max_steps=8, tolerance=1.0), "smoothgrad": dict(samples=3),
          "invert": dict(steps=3), "dream": dict(steps=2, octaves=2), "maximize": dict(steps=3)}


def _cases() -> dict:
    """Every technique of the registry, once per way it can be called: (technique, the parameters it
    uses, options that keep it quick, output shape)."""
    cases = {}
    for name, t in TECHNIQUES.items():
        options = {**t.options, **FASTER.get(name, {}), **(dict(preprocess=PRE) if t.pixels else {})}
        shape = MAP if t.cam else (2, 1, 8, 8) if name == "features" else IMAGE  # features: conv4_x, one channel
        for mode in t.modes:
            label = name if len(t.modes) == 1 else f"{name} {'classes' if 'target' in mode else 'channels'}"
            cases[label] = (t.function, mode, options, shape)
    return cases


METHODS = _cases()
USES = [(name, param) for name, (_, uses, *_) in METHODS.items() for param in sorted(uses)]
REFUSED = [(name, param) for name, (_, uses, *_) in METHODS.items() for param in PARAMETERS if param not in uses]


def test_the_registry_covers_every_method_of_the_shape():
    assert set(METHODS) >= {"features", "grad-cam", "saliency", "occlusion", "deconv", "invert", "dream",
                            "maximize classes", "maximize channels"}
    assert METHODS["maximize classes"][1] == {"target"} and METHODS["maximize channels"][1] == {"layer", "channels"}


@pytest.fixture(scope="module")
def net():
    """A width-4 ResNet with seeded random weights and batch-norm statistics spread out, so that
    every layer's activations vary with the input, and a batch of two normalised inputs."""
    torch.manual_seed(0)
    model = build("resnet18-cifar", num_classes=10, width=4).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def call(name, net, which=0, **changes):
    """``METHODS[name]`` on the network, every parameter it uses at its ``which``-th value."""
    function, uses, options, _ = METHODS[name]
    model, x = net
    given = {p: VALUES[p][which] for p in uses}
    return function(model, x, **{**given, **options, **changes})


@pytest.mark.parametrize("name", METHODS)
def test_every_method_takes_the_same_arguments(net, name):
    out = call(name, net)
    assert isinstance(out, torch.Tensor) and out.shape == METHODS[name][3]
    assert out.isfinite().all() and out.abs().sum() > 0


@pytest.mark.parametrize("name, param", USES)
def test_every_parameter_used_changes_the_result(net, name, param):
    first = call(name, net)
    other = call(name, net, **{param: VALUES[param][1]})
    assert first.shape != other.shape or not torch.allclose(first, other), f"{name}: {param} makes no difference"


@pytest.mark.parametrize("name, param", [(n, p) for n, p in USES if p in ("target", "layer")])
def test_defaults_are_the_predicted_class_and_the_last_feature_block(net, name, param):
    model, x = net
    default = {"target": model(x).argmax(1), "layer": "conv5_x"}[param]
    torch.testing.assert_close(call(name, net, **{param: None}), call(name, net, **{param: default}))


def test_deconv_projects_each_images_strongest_channel_by_default(net):
    model, x = net
    strongest = feature_maps(model, x, layer="conv5_x").flatten(2).amax(2).argmax(1)
    torch.testing.assert_close(deconv(model, x), deconv(model, x, layer="conv5_x", channels=strongest))
    # One channel for every image is one channel per image, repeated.
    torch.testing.assert_close(deconv(model, x, channels=3), deconv(model, x, channels=[3, 3]))


@pytest.mark.parametrize("name, refused", REFUSED)
def test_a_parameter_a_method_does_not_use_is_refused_by_name(net, name, refused):
    with pytest.raises(ValueError, match=f"`{refused}`"):
        call(name, net, **{refused: VALUES[refused][0]})


def test_one_value_per_image_or_one_for_all(net):
    model, x = net
    with pytest.raises(ValueError, match="`target` gives 3 values for 2 images"):
        grad_cam(model, x, target=[1, 2, 3])
    torch.testing.assert_close(grad_cam(model, x, target=4), grad_cam(model, x, target=[4, 4]))


@pytest.mark.parametrize("name", ["invert", "dream", "maximize channels", "maximize classes"])
def test_pixel_methods_return_network_input_of_images_in_range(net, name):
    pixels = call(name, net) * torch.tensor(PRE.std).view(1, 3, 1, 1) + torch.tensor(PRE.mean).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # Without a preprocess the images are the network input itself.
    raw = call(name, net, preprocess=None)
    assert raw.min() >= 0 and raw.max() <= 1


@pytest.mark.parametrize("name", ["dream", "maximize channels", "maximize classes"])
def test_preprocess_is_the_normalisation_in_front_of_the_model(net, name):
    """With ``preprocess``, a method on the model is the method on (normalisation → model) in pixel space."""
    model, x = net
    composed = nn.Sequential(PRE.normalizer(), model).eval()
    layer = {"conv4_x": "1.layer3"}  # the composed model has no Table 1 names, only module paths
    function, uses, options, _ = METHODS[name]
    given = {p: VALUES[p][0] for p in uses}
    with_preprocess = function(model, x, **given, **options)
    given = {p: layer.get(v, v) if p == "layer" else v for p, v in given.items()}
    in_pixels = function(composed, PRE.to_pixels(x), **given, **{**options, "preprocess": None})
    torch.testing.assert_close(PRE.to_pixels(with_preprocess), in_pixels, atol=1e-5, rtol=0)


def test_maximize_starts_from_x(net):
    model, _ = net
    for pixels in (fourier_noise((2, 3, 32, 32)), 0.05 + 0.9 * torch.rand(2, 3, 32, 32)):
        x = PRE.normalizer()(pixels)
        torch.testing.assert_close(maximize(model, x, target=1, preprocess=PRE, steps=0), x, atol=1e-4, rtol=0)
