"""Every figure cnnlab draws is laid out so that no text overlaps another text or a picture, or leaves the figure.

The check draws each figure on an Agg canvas, as saving it would, records every text artist actually
drawn, and compares their window extents with each other, with the figure, and with the extents of
the images drawn in the axes. Text placed on a picture on purpose (the channel numbers of a tile
grid, written in the picture's data coordinates) must stay inside that picture and clear of other text.
"""

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from cnnlab.core.spec import ModelSpec, Preprocess
from cnnlab.inspect import METHODS, Choices, Inspection, show
from cnnlab.models import build
from cnnlab.run import LoadedRun
from cnnlab.visualize.figures import draw, sanity_figure
from cnnlab.viz.sanity import MethodResult, Sanity

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SLACK = 0.5  # pixels: extents are floats, and touching boxes do not overlap


def _overlap(a, b) -> bool:
    return min(a.x1, b.x1) - max(a.x0, b.x0) > SLACK and min(a.y1, b.y1) - max(a.y0, b.y0) > SLACK


def _inside(inner, outer) -> bool:
    return (inner.x0 >= outer.x0 - SLACK and inner.y0 >= outer.y0 - SLACK and inner.x1 <= outer.x1 + SLACK
            and inner.y1 <= outer.y1 + SLACK)


def layout_problems(fig: Figure) -> list[str]:
    """What is wrong with the layout of ``fig``: overlapping texts, text over a picture, text off the figure."""
    canvas = FigureCanvasAgg(fig)
    drawn: list[Text] = []
    draw = Text.draw

    def record(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)

    with mock.patch.object(Text, "draw", record):
        canvas.draw()
    renderer = canvas.get_renderer()
    texts = [(t, t.get_window_extent(renderer)) for t in drawn]
    images = [(ax, im.get_window_extent(renderer)) for ax in fig.axes for im in ax.get_images() if im.get_visible()]
    problems = []
    for i, (t, box) in enumerate(texts):
        name = repr(t.get_text()[:40])
        if not _inside(box, fig.bbox):
            problems.append(f"{name} leaves the figure: {box.bounds} outside {fig.bbox.bounds}")
        for other, other_box in texts[i + 1:]:
            if _overlap(box, other_box):
                problems.append(f"{name} overlaps {other.get_text()[:40]!r}")
        on_picture = t.axes is not None and t.get_transform() == t.axes.transData
        for ax, picture in images:
            if on_picture and ax is t.axes:
                if not _inside(box, picture):
                    problems.append(f"{name}, written on a picture, leaves it")
            elif _overlap(box, picture):
                problems.append(f"{name} overlaps a picture")
    return problems


def test_the_check_sees_overlaps():
    fig = Figure(figsize=(2, 2))
    ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
    ax.imshow(np.zeros((4, 4)))
    ax.axis("off")
    fig.text(0.5, 0.5, "over the picture")
    fig.text(0.5, 0.52, "and over that text")
    fig.text(0.95, 0.95, "off the edge")
    problems = layout_problems(fig)
    assert any("overlaps a picture" in p for p in problems)
    assert any("overlaps 'and over that text'" in p for p in problems)
    assert any("leaves the figure" in p for p in problems)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A run-shaped object around a seeded width-4 model and random test images: figures need no training."""
    torch.manual_seed(0)
    model = build("resnet18-cifar", num_classes=10, width=4).eval()
    pre = Preprocess(32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    photo = tmp_path_factory.mktemp("photos") / "a_photo_with_a_rather_long_file_name_from_a_phone_camera.png"
    from PIL import Image

    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(photo)
    run = LoadedRun(model, ModelSpec("resnet18-cifar", 10, 4, 3), pre, CLASSES, None, Path("fake.pt"), None,
                    None, (images, torch.arange(12) % 10))
    return run, str(photo)


# Each method with the choices the command and the report use, small enough to draw in a second or two.
CASES = {
    "filters conv1": ("filters", dict(layer=["conv1"], channel=[1])),
    "filters conv2_x": ("filters", dict(layer=["conv2_x"])),
    "features": ("features", dict(layer=["conv1", "conv5_x"], index=[3])),
    "features of a file": ("features", dict(layer=["conv5_x"], image=["PHOTO"])),
    "cam": ("cam", dict(index=[0, 1, 2, 3], kind=["grad-cam", "grad-cam++", "layer-cam"])),
    "cam, several targets": ("cam", dict(index=[1], target=[1, 3], kind=["grad-cam"])),
    "cam of a file": ("cam", dict(image=["PHOTO"], kind=["grad-cam"])),
    "attribute": ("attribute", dict(index=[0, 1], kind=["saliency", "guided-backprop", "guided-grad-cam",
                                                         "occlusion"])),
    "top-images": ("top-images", dict(layer=["conv4_x"], channel=[2], count=4)),
    "deconv": ("deconv", dict(index=[5], count=3)),
    "invert": ("invert", dict(index=[0], layer=["conv1", "conv3_x"], steps=1)),
    "maximize classes": ("maximize", dict(target=list(range(10)), steps=1)),
    "maximize channels": ("maximize", dict(layer=["conv4_x"], channel=[0, 1, 2], steps=1)),
    "dream": ("dream", dict(index=[2], steps=1)),
    "embedding": ("embedding", dict(count=12)),
}


def test_every_method_is_checked():
    assert {method for method, _ in CASES.values()} == set(METHODS) - {"sanity"}  # its figure is checked below


@pytest.mark.parametrize("case", CASES)
def test_no_text_overlaps_in_any_figure(fake_run, case):
    run, photo = fake_run
    method, choices = CASES[case]
    choices = {k: [photo if v == "PHOTO" else v for v in values] if isinstance(values, list) else values
               for k, values in choices.items()}
    figures = {stem: fig for result in show(Inspection(run), method, Choices.of(**choices))
               for stem, fig in draw(result).items()}
    assert figures
    for stem, fig in figures.items():
        assert layout_problems(fig) == [], stem


def test_no_text_overlaps_in_the_sanity_figure():
    steps = ["fc", "conv5_x", "conv1"]
    row = MethodResult({s: [0.5, 0.25] for s in steps}, None, [0.1, 0.2], [0.3, 0.4], [0.0, 0.1], [0.5], [0.5])
    names = ["grad-cam", "integrated-gradients"]
    maps = {n: [torch.rand(32, 32) - 0.5 for _ in range(1 + len(steps))] for n in names}
    result = Sanity({n: row for n in names}, row, steps, "conv5_x", 2, 8, [0.5], "not run", maps)
    fig = sanity_figure(result, np.random.default_rng(0).random((32, 32, 3)), "test image 7\npred automobile (0.93)")
    assert layout_problems(fig) == []
