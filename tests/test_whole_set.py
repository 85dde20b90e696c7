"""The test set through the network's eyes (its embedding) and its mistakes, in every front-end.

Each figure is checked against a direct computation: the embedded features against those a forward hook
of the test's own records on the last linear layer, the confused pairs against a confusion built by hand,
the top losses against cross-entropy written out, the prototypes against cosine distances computed here.
The explorer's answers are the inspector's numbers; its map is driven in Chromium.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pagewatch import watch
from PIL import Image
from starlette.testclient import TestClient

from cnnlab import cli
from cnnlab.inspect import Inspection
from cnnlab.report import page as report_page
from cnnlab.report import sections
from cnnlab.serve import load_runs
from cnnlab.serve.app import create_app
from cnnlab.serve.jobs import Jobs
from cnnlab.viz.embedding import last_linear, spread_points, tsne
from cnnlab.viz.mistakes import confused_pairs, top_losses, typical

pytestmark = pytest.mark.usefixtures("one_thread")
ARTIFACTS = Path(os.environ.get("CNNLAB_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))


@pytest.fixture(scope="module")
def inspection(small_run) -> Inspection:
    return Inspection.open(small_run, device="cpu")


def _own_features(inspection: Inspection) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output of the model's ``fc`` for every test image, recorded by a hook of the test's own,
    averaged over the mirror image where the run scores with flip TTA."""
    model = inspection.model.eval()
    fc = model.fc
    assert isinstance(fc, torch.nn.Linear)
    seen: list[torch.Tensor] = []
    hook = fc.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    images, _ = inspection.test_set()
    ins, outs = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(images), 64):
                x = inspection.preprocess.to_input(images[start:start + 64])
                views = [x, x.flip(-1)] if inspection.run.tta else [x]
                out = sum(model(v) for v in views) / len(views)
                ins.append(sum(seen) / len(seen))
                outs.append(out)
                seen.clear()
    finally:
        hook.remove()
    return torch.cat(ins), torch.cat(outs)


# --- the embedding --------------------------------------------------------------------------------------


def test_the_embedding_embeds_the_input_of_the_last_linear_layer(inspection):
    result = inspection.embedding()
    features, logits = _own_features(inspection)
    n = len(inspection.test_set()[1])
    assert result.layer == "fc" and last_linear(inspection.model)[0] == "fc"
    assert result.indices.tolist() == list(range(n)) and result.points.shape == (n, 2)
    torch.testing.assert_close(result.features, features, rtol=1e-4, atol=1e-5)
    # The one scoring pass gave both: fc of the recorded features is the scores' logits.
    scores = inspection.scores()
    torch.testing.assert_close(scores.logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inspection.model.fc(scores.features), scores.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(result.labels, scores.labels) and torch.equal(result.predictions, scores.predictions)
    torch.testing.assert_close(result.probabilities, scores.probabilities.amax(1))
    # The thumbnails are a spread of the map, the images as the network sees them.
    assert 4 <= len(result.shown) <= 64 and len(set(result.shown)) == len(result.shown)
    assert result.pixels.shape == (len(result.shown), 3, 32, 32)
    # A count embeds a spread of the test set; the same seed gives the same map.
    fewer = inspection.embedding(count=50)
    assert len(fewer.indices) == 50 and fewer.indices[0] == 0 and fewer.indices[-1] == n - 1
    assert torch.equal(tsne(result.features, seed=0), result.points)
    assert not torch.equal(tsne(result.features, seed=1), result.points)


def test_tsne_keeps_neighbours_together():
    # Five well-separated clusters in 64 dimensions: on the map each point's nearest neighbours share its cluster.
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 64, generator=g) * 10
    labels = torch.arange(150) % 5
    points = tsne(centres[labels] + torch.randn(150, 64, generator=g), seed=3)
    d = torch.cdist(points, points)
    d.fill_diagonal_(math.inf)
    neighbours = d.topk(5, largest=False).indices
    assert (labels[neighbours] == labels[:, None]).float().mean() > 0.98


def test_spread_points_takes_the_point_nearest_each_cells_centre():
    points = torch.tensor([[0.0, 0.0], [0.9, 0.9], [1.0, 1.0], [3.9, 3.9], [4.0, 4.0], [2.1, 0.1]])
    # A 2 × 2 grid over [0, 4]²: cells centred at 1 and 3; point 3 is nearer (3, 3) than point 4.
    assert sorted(spread_points(points, grid=2)) == [2, 3, 5]


def test_too_few_images_for_a_map_is_one_line():
    from cnnlab.core.errors import UserError

    with pytest.raises(UserError, match="at least 4 test images.*`count`"):
        tsne(torch.randn(3, 8))


# --- the mistakes ---------------------------------------------------------------------------------------


def test_confused_pairs_against_a_hand_built_confusion():
    # true → predicted, by hand: 0→1 three times, 1→0 once, 2→1 three times, 2→0 once, 3 always right.
    cases = [(0, 1)] * 3 + [(0, 0)] * 2 + [(1, 0)] + [(1, 1)] * 4 + [(2, 1)] * 3 + [(2, 0)] + [(3, 3)] * 5
    order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([cases[i][0] for i in order])
    predictions = torch.tensor([cases[i][1] for i in order])
    pairs = confused_pairs(predictions, labels, 4, count=3, examples=2)
    # Most first; the tie (3 and 3) in class order.
    assert [(p.true, p.predicted, p.count, p.reverse) for p in pairs] == [(0, 1, 3, 1), (2, 1, 3, 0), (1, 0, 1, 3)]
    assert [round(p.share, 4) for p in pairs] == [0.6, 0.75, 0.2]
    for p in pairs:
        where = [i for i in range(len(labels)) if (labels[i], predictions[i]) == (p.true, p.predicted)]
        assert p.examples == where[:2]


def test_top_losses_are_the_cross_entropy_written_out():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(40, 5, generator=g) * 3
    labels = torch.randint(0, 5, (40,), generator=g)
    by_hand = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits.tolist(), labels.tolist())]
    indices, losses = top_losses(logits, labels, count=7)
    expected = sorted(range(40), key=lambda i: -by_hand[i])[:7]
    assert indices.tolist() == expected
    assert losses.tolist() == pytest.approx([by_hand[i] for i in expected], rel=1e-5)


def test_prototypes_are_nearest_the_class_mean_direction():
    g = torch.Generator().manual_seed(3)
    features = torch.rand(60, 6, generator=g)
    labels = torch.arange(60) % 3
    labels[labels == 2] = 0  # class 2 has no images and is left out
    found = typical(features, labels, 3, count=3)
    assert [t.label for t in found] == [0, 1]
    for t in found:
        members = [i for i in range(60) if labels[i] == t.label]
        rows = {i: np.asarray(features[i], dtype=np.float64) for i in members}
        unit = {i: row / np.linalg.norm(row) for i, row in rows.items()}
        mean = sum(unit.values()) / len(members)
        mean /= np.linalg.norm(mean)
        distance = {i: 1 - float(unit[i] @ mean) for i in members}
        ranked = sorted(members, key=distance.get)
        assert t.most == ranked[:3] and t.least == ranked[::-1][:3]
        assert t.most_distance == pytest.approx([distance[i] for i in ranked[:3]], abs=1e-9)


def test_the_inspectors_mistakes_are_the_runs_scores(inspection):
    found = inspection.mistakes()
    scores = inspection.scores()
    losses = torch.nn.functional.cross_entropy(scores.logits, scores.labels, reduction="none")
    assert found.n == len(scores.labels) and found.wrong == int((scores.predictions != scores.labels).sum())
    assert [x.index for x in found.losses] == losses.topk(len(found.losses)).indices.tolist()
    assert found.losses[0].loss == pytest.approx(float(losses.max()), rel=1e-5)
    first = found.losses[0]
    assert first.label == int(scores.labels[first.index]) and first.prediction == int(scores.predictions[first.index])
    assert first.label_probability == pytest.approx(float(scores.probabilities[first.index, first.label]))
    assert found.layer == "fc" and {t.label for t in found.typical} == set(scores.labels.tolist())
    expected = typical(scores.features, scores.labels, len(inspection.classes))
    assert [t.most for t in found.typical] == [t.most for t in expected]


# --- the report --------------------------------------------------------------------------------------------


def test_the_reports_embedding_and_mistakes_sections(inspection, small_run):
    contents = sections.Contents(small_run, {}, [], [], 0, small_run / "checkpoints" / "best.pt", None,
                                 list(inspection.classes))
    scores = inspection.scores()
    sections._whole_set(contents, inspection, scores)
    assert contents.notes == {}
    assert contents.embedding is not None and contents.embedding.uri.startswith("data:image/png;base64,")
    assert contents.embedding_facts["n"] == len(scores.labels) and contents.embedding_facts["layer"] == "fc"
    found = inspection.mistakes()
    assert [x.example.index for x in contents.losses] == [x.index for x in found.losses]
    assert [t.name for t in contents.typical] == [inspection.classes[t.label] for t in found.typical]
    html = report_page._embedding(contents) + report_page._mistakes(contents)
    assert f"{len(scores.labels)} test images placed by the input of fc" in html
    top = found.losses[0]
    assert f"#{top.index} loss {top.loss:.2f}" in html
    assert html.count('<figure class="thumb">') == len(found.losses) + sum(len(t.most) + len(t.least)
                                                                           for t in found.typical)
    assert {"embedding", "mistakes"} <= set(report_page.SECTIONS)


# --- the command ---------------------------------------------------------------------------------------------


def test_visualize_embedding_writes_the_map_and_the_projector(small_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("explore", "tb", "viz"))
    assert cli.main(["visualize", "embedding", str(run), "--device", "cpu", "--count", "60"]) == 0
    assert f"wrote {run / 'viz' / 'embedding' / 'embedding.png'}" in capsys.readouterr().out
    with Image.open(run / "viz" / "embedding" / "embedding.png") as img:
        assert img.size[0] > 1000
    config = (run / "tb" / "projector_config.pbtxt").read_text()
    assert "sprite" in config and "single_image_dim: 32" in config
    (folder,) = [p for p in (run / "tb").rglob("tensors.tsv")]
    result = Inspection.open(run, device="cpu").embedding(count=60)
    tensors = np.loadtxt(folder, delimiter="\t")
    np.testing.assert_allclose(tensors, result.features.numpy(), rtol=1e-4, atol=1e-5)
    with (folder.parent / "metadata.tsv").open() as f:
        rows = list(csv.reader(f, delimiter="\t"))
    classes = result.classes
    assert rows[0] == ["index", "true", "predicted", "probability"] and len(rows) == 61
    assert rows[1:3] == [[str(int(i)), classes[int(t)], classes[int(p)], f"{float(q):.3f}"] for i, t, p, q in
                         zip(result.indices[:2], result.labels[:2], result.predictions[:2], result.probabilities[:2])]
    with Image.open(folder.parent / "sprite.png") as sprite:
        assert sprite.size == (8 * 32, 8 * 32)  # 60 thumbnails of 32 px on an 8 × 8 grid


def test_visualize_embedding_refuses_what_it_does_not_use(small_run, capsys):
    assert cli.main(["visualize", "embedding", str(small_run), "--layer", "conv1"]) == 2
    assert "embedding does not use --layer; it uses --count" in capsys.readouterr().err


# --- the explorer ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(runs):
    return load_runs(runs[:1], jobs=Jobs(idle=5.0))


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served), base_url="http://127.0.0.1:8000") as c:
        yield c


def _done(client: TestClient, path: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
        data = r.json()
        assert data["state"] != "failed", data
        if data["state"] == "done":
            return data["result"]
        assert time.monotonic() < deadline, f"{path} still {data['state']}"
        time.sleep(0.05)


def test_the_explorers_map_is_the_inspectors(client, runs):
    got = _done(client, "/api/0/embedding")
    result = Inspection.open(runs[0], device="cpu").embedding()
    assert got["indices"] == result.indices.tolist() and got["layer"] == "fc"
    np.testing.assert_allclose(got["points"], result.points.numpy(), atol=1e-3)
    assert got["labels"] == result.labels.tolist() and got["predictions"] == result.predictions.tolist()
    assert got["colours"][:2] == ["#1f77b4", "#ff7f0e"] and len(got["colours"]) == len(result.classes)
    assert (runs[0] / "explore" / "embedding.json").is_file()  # cached beside the run

    image = client.get("/api/0/test-image?index=3").json()
    assert image["ref"] == "t0-3" and image["label"] == result.classes[int(result.labels[3])]
    assert image["thumb"].startswith("data:image/png;base64,")
    for bad in ("index=100000", "index=-1", "index=x", ""):
        r = client.get(f"/api/0/test-image?{bad}")
        assert r.status_code == 400 and "index" in r.json()["error"]


def test_the_explorers_mistakes_are_the_inspectors(client, runs):
    got = _done(client, "/api/0/mistakes?class=1")
    found = Inspection.open(runs[0], device="cpu").mistakes()
    assert [(p["true"], p["predicted"], p["count"], p["examples"]) for p in got["pairs"]] == [
        (p.true, p.predicted, p.count, p.examples) for p in found.pairs]
    assert [x["index"] for x in got["losses"]] == [x.index for x in found.losses]
    assert [x["loss"] for x in got["losses"]] == pytest.approx([x.loss for x in found.losses], rel=1e-6)
    (one,) = got["typical"]
    assert got["class"] == 1 and one["most"] == next(t.most for t in found.typical if t.label == 1)
    shown = {i for p in got["pairs"] for i in p["examples"]} | {x["index"] for x in got["losses"]}
    assert shown | set(one["most"]) | set(one["least"]) == {int(k) for k in got["thumbs"]}
    assert client.get("/api/0/mistakes?class=99").status_code == 400


# --- the map in a browser --------------------------------------------------------------------------------------


def test_the_map_in_a_browser(runs, browser):
    from test_serve import Server

    server = Server(runs[:1], runs[0].parent / "serve-map.log")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    seen = watch(page)
    try:
        page.goto(server.url + "run/0", wait_until="load")
        circles = page.locator("#map-svg circle")
        circles.nth(0).wait_for(timeout=120_000)
        served = json.loads((runs[0] / "explore" / "embedding.json").read_text())["result"]  # what the page drew
        assert circles.count() == len(served["indices"])
        # A point no other point covers: the pointer reaches it and nothing else.
        k = page.evaluate("""() => [...document.querySelectorAll('#map-svg circle')].findIndex(c => {
            c.scrollIntoView({block: 'center'});
            const r = c.getBoundingClientRect();
            return document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2) === c; })""")
        assert k >= 0
        point = circles.nth(k)
        index = int(point.get_attribute("data-index"))
        assert index == served["indices"][k]
        # Through the locator, not at coordinates read once: the panels above the map fill in as their jobs
        # finish and move it; Playwright waits for the point to stand still and checks that it gets the event.
        point.hover()
        page.locator("#map-tip-image").wait_for(state="visible")
        classes = served["classes"]
        text = page.inner_text("#map-tip-text")
        head = f"#{index} true {classes[served['labels'][k]]}, predicted {classes[served['predictions'][k]]} ("
        assert text.startswith(head) and text.endswith("%)")
        assert abs(int(text[len(head):-2]) - 100 * served["probabilities"][k]) <= 0.5 + 1e-9  # rounded to a percent
        assert page.get_attribute("#map-tip-image", "src").startswith("data:image/png;base64,")
        assert len(page.locator("#map-legend li").all()) == len(classes)
        point.click()
        page.wait_for_function("i => document.getElementById('input-caption').textContent.startsWith("
                               "`test image ${i} (true class`)", arg=index)
        assert page.locator("#top5 tbody tr").count() == 5
        # The mistakes panel: pairs, losses and a class's typical images, each a thumbnail that loads the image.
        page.locator("#losses figure").first.wait_for(timeout=60_000)
        assert page.locator("#losses figure").count() == 24
        assert page.locator("#typical-most figure").count() >= 1
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.locator("section#map").screenshot(path=str(ARTIFACTS / "explorer-map.png"))
        page.locator("section#mistakes").screenshot(path=str(ARTIFACTS / "explorer-mistakes.png"))
        assert seen.errors == [] and seen.dialogs == []
        assert seen.hosts <= {"127.0.0.1", "data"}, seen.hosts
    finally:
        page.close()
        server.stop()
