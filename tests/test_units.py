"""Unit pages: the one-pass statistics against direct computations, the receptive field against a hand
computation, lucid's diversity term, the dossier folder (``cnnlab visualize dossier``), and the explorer's
unit pages (TestClient and Chromium)."""

from __future__ import annotations

import html
import re
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pagewatch import watch
from starlette.testclient import TestClient
from torch import nn

from cnnlab import cli
from cnnlab.core.spec import Preprocess
from cnnlab.inspect import Inspection
from cnnlab.models import build
from cnnlab.report.dossier import contents, index_page, page_name, unit_page, write_pages
from cnnlab.run import load
from cnnlab.serve import load_runs
from cnnlab.serve import runs as served_runs
from cnnlab.serve.app import create_app
from cnnlab.serve.jobs import Jobs
from cnnlab.viz.features import feature_maps
from cnnlab.viz.layers import capture
from cnnlab.viz.maximize import fourier_noise, gram_similarity, maximize, objective
from cnnlab.viz.units import receptive_fields, selectivity, unit_filters, unit_statistics

LAYER = "conv5_x"  # the small run's last stage (resnet18-cifar at 32 px, width 8: 64 channels of 4×4)


# --- the statistics -----------------------------------------------------------------------------------------


def test_statistics_equal_a_direct_computation(small_run, one_thread):
    loaded = load(small_run)
    images, labels = loaded.test_set()
    classes = len(loaded.classes)
    # Batches of 37 make the running top-k merge across batches, and the last batch a partial one.
    stats = unit_statistics(loaded.model, images, labels, loaded.preprocess, layer=LAYER, classes=classes, top_k=5,
                            batch_size=37)
    with torch.no_grad():
        acts = capture(loaded.model, loaded.preprocess.to_input(images), [LAYER])[LAYER].double()  # (N, C, h, w)
    n, c, h, w = acts.shape
    assert stats.map_size == (h, w)
    means = acts.mean((2, 3))
    direct = torch.stack([means[labels == k].mean(0) for k in range(classes)], 1)  # (C, classes)
    torch.testing.assert_close(stats.class_means.double(), direct, rtol=1e-4, atol=1e-5)
    for ch in (0, 7, c - 1):
        mu = direct[ch].tolist()
        top = max(mu)
        rest = (sum(mu) - top) / (classes - 1)
        assert float(stats.selectivity[ch]) == pytest.approx((top - rest) / (top + rest), rel=1e-4, abs=1e-6)
    assert stats.selectivity.min() >= 0 and stats.selectivity.max() <= 1
    # The top images: a brute-force sort of every image's strongest activation.
    strongest = acts.flatten(2).amax(2)  # (N, C)
    for ch in range(c):
        order = strongest[:, ch].argsort(descending=True)[:5]
        torch.testing.assert_close(stats.top_scores[ch].double(), strongest[order, ch], rtol=1e-4, atol=1e-5)
        best = int(stats.top_indices[ch, 0])
        assert strongest[best, ch] == pytest.approx(float(strongest[:, ch].max()), rel=1e-4)
        r, col = stats.top_where[ch, 0].tolist()
        assert acts[best, ch, r, col] == pytest.approx(float(strongest[best, ch]), rel=1e-4)
    assert (stats.histogram.sum(1) == n).all()
    torch.testing.assert_close(stats.best_mean.double(), means.amax(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.edges[:, 0].double(), means.amin(0), rtol=1e-4, atol=1e-5)


def test_selectivity_of_hand_made_means():
    means = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [3.0, 1.0, 2.0]])
    # (3 - 1.5) / (3 + 1.5) = 1/3 for the last one
    torch.testing.assert_close(selectivity(means), torch.tensor([1.0, 0.0, 0.0, 1 / 3]))


# --- the receptive field ------------------------------------------------------------------------------------


def test_receptive_field_equals_a_hand_computation():
    # conv 3×3/1 p1 → max pool 2/2 → conv 3×3/2 p1 → conv 5×5/1 p0. By hand (size r, jump j, start s of unit 0):
    # r 3, j 1, s -1; r 4, j 2, s -1; r 8, j 4, s -3; r 24, j 4, s -3. Unit k sees rows 4k - 3 … 4k + 20, clipped.
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(4, 4, 3, 2, 1),
                        nn.ReLU(inplace=True), nn.Conv2d(4, 4, 5, 1, 0))
    rows, cols = receptive_fields(net, "5", 32)
    hand = [(max(0, 4 * k - 3), min(32, 4 * k + 21)) for k in range(4)]
    assert rows == hand and cols == hand


def test_receptive_field_of_the_resnets_by_hand():
    # CIFAR ResNet, conv2_x: the 3×3 stem and two blocks of two 3×3 convs, stride 1: 11 pixels, centred.
    rows, _ = receptive_fields(build("resnet18-cifar", num_classes=10, width=4).eval(), "conv2_x", 32)
    assert rows == [(max(0, k - 5), min(32, k + 6)) for k in range(32)]
    # torchvision's ResNet-18, layer1 at 64 px: 7×7/2 p3 stem (r 7, j 2, s -3), 3×3/2 p1 max pool (r 11, j 4,
    # s -5), four 3×3 convs (r 43, s -21): unit k sees 4k - 21 … 4k + 21.
    rows, cols = receptive_fields(build("torchvision:resnet18", num_classes=10).eval(), "layer1", 64)
    assert rows == cols == [(max(0, 4 * k - 21), min(64, 4 * k + 22)) for k in range(16)]


# --- the diversity term -------------------------------------------------------------------------------------


def test_gram_similarity_of_hand_made_maps():
    a = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]], [[[2.0, 0.0]], [[0.0, 0.0]]], [[[0.0, 0.0]], [[0.0, 1.0]]]])
    # images 0 and 1 have proportional Gram matrices (cosine 1); image 2's is orthogonal to both
    sim = gram_similarity(a, torch.tensor([0, 0, 0]))
    torch.testing.assert_close(sim, torch.tensor([1 / 3, 1 / 3, 0.0]))
    # only images of one group are compared
    torch.testing.assert_close(gram_similarity(a, torch.tensor([0, 1, 1])), torch.tensor([0.0, 0.0, 0.0]))


def test_diversity_makes_the_variants_less_alike(one_thread):
    torch.manual_seed(0)
    model = build("resnet18-cifar", num_classes=10, width=4).eval()
    x = fourier_noise((6, 3, 32, 32))
    picks = torch.tensor([0, 0, 0, 1, 1, 1])
    similar = {}
    for weight in (0.0, 8.0):
        # without the random transforms, so that the term alone is what differs between the two
        y = maximize(model, x, layer="conv3_x", channels=picks, steps=32, transforms=False, diversity=weight)
        with torch.no_grad():
            similar[weight] = float(gram_similarity(feature_maps(model, y, layer="conv3_x"), picks).mean())
    assert similar[8.0] < similar[0.0] - 0.1


# --- every family, end to end -------------------------------------------------------------------------------


def _inspection(model: nn.Module, size: int, n: int = 40) -> Inspection:
    """An Inspection of ``model`` over ``n`` random test images of ``size`` px in 4 classes (no run folder)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 4
    run = SimpleNamespace(model=model.eval(), preprocess=Preprocess(size, 3), classes=["a", "b", "c", "<d>"],
                          device=torch.device("cpu"), temperature=None, test_set=lambda data_dir=None: (images, labels),
                          training_set=lambda data_dir=None: (images, labels))
    return Inspection(run)  # type: ignore[arg-type]


@pytest.mark.parametrize("name, layer, size", [("resnet18", "conv5_x", 64), ("resnet18-cifar", "conv4_x", 32),
                                               ("torchvision:mobilenet_v3_small", "features", 64)])
def test_unit_pages_on_every_family(name, layer, size, one_thread):
    torch.manual_seed(0)
    width = {"width": 4} if not name.startswith("torchvision:") else {}
    inspection = _inspection(build(name, num_classes=4, **width), size)
    result = inspection.units(layer, [0, 3], top_k=3, variants=2, steps=2)
    assert result.channels == [0, 3] and result.top_indices.shape == (2, 3)
    assert result.variants.shape == (2, 2, 3, size, size) and result.reached.shape == (2, 2)
    h, w = result.map_size
    boxes = result.boxes
    assert ((boxes[..., 0] < boxes[..., 2]) & (boxes[..., 1] < boxes[..., 3])).all()
    assert boxes.min() >= 0 and boxes.max() <= size
    assert torch.isfinite(result.selectivity).all()
    # The quality figure: what the variants reach (measured again here) over the best test image's activation.
    x = inspection.preprocess.normalizer()(result.variants.flatten(0, 1))
    with torch.no_grad():
        again = objective(inspection.model, x, layer=layer, channels=[0, 0, 3, 3]).reshape(2, 2)
    torch.testing.assert_close(result.reached, again, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(result.quality, again.mean(1) / result.best_mean, rtol=1e-3, atol=1e-3)
    found = unit_filters(inspection.model, layer, result.count)
    if found is not None:
        torch.testing.assert_close(result.filters, found[1][[0, 3]])
    images, _ = inspection.test_set()
    data = contents(result, images, name)
    assert "&lt;d&gt;" in unit_page(data, 0, _assets()) and "<d>" not in unit_page(data, 1, _assets())


def _assets():
    from cnnlab.report.dossier import folder_assets

    return folder_assets()


# --- the dossier folder -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dossier(small_run, tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("dossier") / "conv4"
    assert cli.main(["visualize", "dossier", str(small_run), "--layer", LAYER, "--units", "0", "5", "9", "--steps",
                     "3", "--variants", "2", "--out", str(out)]) == 0
    return out


def _strong(page: str, name: str) -> str:
    return html.unescape(re.search(rf'<strong id="{name}">([^<]*)</strong>', page)[1])


def test_dossier_pages_hold_the_result(dossier, small_run):
    assert sorted(p.name for p in dossier.iterdir()) == ["index.html", "unit-0000.html", "unit-0005.html",
                                                         "unit-0009.html"]
    loaded = load(small_run)
    images, labels = loaded.test_set()
    stats = unit_statistics(loaded.model, images, labels, loaded.preprocess, layer=LAYER, classes=10)
    index = (dossier / "index.html").read_text()
    for ch in (0, 5, 9):
        page = (dossier / page_name(ch)).read_text()
        assert f"Unit {ch} of {LAYER}" in page
        assert float(_strong(page, "selectivity-index")) == pytest.approx(float(stats.selectivity[ch]), abs=1e-3)
        assert _strong(page, "preferred") == loaded.classes[int(stats.class_means[ch].argmax())]
        shown = [int(i) for i in re.findall(r'alt="test image ([0-9]+)"', page)]
        assert shown == stats.top_indices[ch].tolist()
        assert f'href="{page_name(ch)}"' in index
        assert f'data-selectivity="{float(stats.selectivity[ch]):.4f}"' in index
    assert index.count('class="unit"') == 3


def test_dossier_refuses_what_it_does_not_use(small_run, tmp_path, capsys):
    for args, said in ((["--channel", "3"], "dossier does not use --channel"),
                       (["--layer", "conv4_x", LAYER], "one --layer"),
                       (["--units", "64"], "--units: channel 64 is out of range; conv5_x has 64 channels")):
        assert cli.main(["visualize", "dossier", str(small_run), *args, "--out", str(tmp_path)]) == 2
        assert said in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert cli.main(["visualize", "maximize", str(small_run), "--units", "3"]) == 2
    assert "--units is for cnnlab visualize dossier" in capsys.readouterr().err


# --- the explorer -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(runs, one_thread):
    steps, variants = served_runs.UNIT_STEPS, served_runs.UNIT_VARIANTS
    served_runs.UNIT_STEPS, served_runs.UNIT_VARIANTS = 2, 2
    yield load_runs(runs[:1], jobs=Jobs(idle=5.0))
    served_runs.UNIT_STEPS, served_runs.UNIT_VARIANTS = steps, variants


def _ready(client: TestClient, path: str, timeout: float = 240) -> str:
    """Asks ``path`` until it is no longer the waiting page (as the page's refresh does); its HTML."""
    end = time.monotonic() + timeout
    while True:
        answer = client.get(path)
        assert answer.status_code == 200, answer.text
        if 'id="waiting"' not in answer.text:
            return answer.text
        assert 'http-equiv="refresh"' in answer.text
        assert time.monotonic() < end, "the unit pages were not computed in time"
        time.sleep(0.3)


def test_explorer_serves_the_same_pages(served, runs, small_run):
    with TestClient(create_app(served), base_url="http://127.0.0.1") as client:
        index = _ready(client, f"/run/0/units/{LAYER}")
        assert index.count('class="unit"') == 64
        assert f'href="/run/0/unit/{LAYER}/7"' in index and '<script src="/static/units.js">' in index
        page = client.get(f"/run/0/unit/{LAYER}/7").text
        assert client.get("/static/units.js").status_code == 200
        assert ".units a.unit" in client.get("/static/units.css").text
        assert client.get(f"/run/0/unit/{LAYER}/64").status_code == 404
        assert client.get(f"/run/0/unit/{LAYER}/x7").status_code == 404
        assert client.get("/run/3/units/conv5_x").status_code == 404
        bad = client.get("/run/0/units/nope")
        assert bad.status_code == 400 and "unknown layer 'nope'" in bad.json()["error"]
        assert f'href="/run/0/units/{LAYER}"' in client.get("/run/0").text
    # One renderer: the page is the one the dossier folder gets from the cached result, but for its links.
    cached = served[0].units(LAYER).result
    position = [u["channel"] for u in cached["units"]].index(7)
    written = unit_page(cached, position, _assets())
    assert _strong(page, "selectivity-index") == _strong(written, "selectivity-index")
    loaded = load(small_run)
    images, labels = loaded.test_set()
    stats = unit_statistics(loaded.model, images, labels, loaded.preprocess, layer=LAYER, classes=10)
    assert float(_strong(page, "selectivity-index")) == pytest.approx(float(stats.selectivity[7]), abs=1e-3)
    assert (runs[0] / "explore" / "units" / f"{LAYER}.json").is_file()
    assert served[0].jobs.computed[f"0:units:layer={LAYER}:steps=2:variants=2"] == 1


# --- in a browser ---------------------------------------------------------------------------------------------


def _sorted_channels(page) -> list[int]:
    return [int(v) for v in page.eval_on_selector_all("#units a.unit", "cells => cells.map(c => c.dataset.channel)")]


def test_dossier_in_a_browser(dossier, browser):
    page = browser.new_page()
    seen = watch(page)
    page.goto((dossier / "index.html").as_uri(), wait_until="load")
    assert _sorted_channels(page) == [0, 5, 9]
    page.select_option("#sort", "selectivity")
    values = [float(v) for v in page.eval_on_selector_all("#units a.unit", "c => c.map(x => x.dataset.selectivity)")]
    assert values == sorted(values, reverse=True)
    page.click('#units a.unit[data-channel="5"]')
    page.wait_for_url("**/unit-0005.html")
    assert page.inner_text("h1").startswith(f"Unit 5 of {LAYER}")
    assert page.locator("#top img").count() == 9 and page.locator("#maximised img").count() == 2
    assert page.locator("#class-means rect").count() == 10
    page.click("text=all units of")
    page.wait_for_url("**/index.html")
    page.close()
    assert not seen.errors and not seen.dialogs, seen
    assert seen.hosts <= {"file", "data"}, seen.hosts


def test_explorer_unit_pages_in_a_browser(served, browser):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(served, port=port), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        page = browser.new_page()
        seen = watch(page)
        page.goto(f"http://127.0.0.1:{port}/run/0/units/{LAYER}")
        page.locator("#units").wait_for(timeout=240_000)  # the waiting page reloads itself until then
        page.select_option("#sort", "class")
        classes = [int(v) for v in page.eval_on_selector_all("#units a.unit", "c => c.map(x => x.dataset.class)")]
        assert classes == sorted(classes) and len(classes) == 64
        page.click(f'#units a.unit[data-channel="{_sorted_channels(page)[0]}"]')
        page.wait_for_url(f"**/run/0/unit/{LAYER}/*")
        assert page.locator("#top img").count() == 9
        page.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not seen.errors and not seen.dialogs, seen
    assert seen.hosts <= {"127.0.0.1", "data"}, seen.hosts


def test_index_and_pages_escape_names(tmp_path, one_thread):
    inspection = _inspection(build("resnet18-cifar", num_classes=4, width=4), 32, n=12)
    result = inspection.units("conv2_x", [1], top_k=2, variants=1, steps=0)
    data = contents(result, inspection.test_set()[0], "<run>")
    files = write_pages(data, tmp_path / "d")
    assert [f.name for f in files] == ["index.html", "unit-0001.html"]
    assert "<run>" not in index_page(data, _assets()) and "&lt;run&gt;" in files[0].read_text()
