"""Calibration and the figures beyond top-1: against their definitions, torchmetrics, and a trained run."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from test_train import tiny
from torchmetrics.functional.classification import (
    multiclass_calibration_error,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from cnnlab import cli, run
from cnnlab.core.calibration import bootstrap_interval, calibration, classification, fit_temperature, reliability
from cnnlab.core.metrics import logits as model_logits
from cnnlab.core.metrics import score
from cnnlab.data import open_dataset
from cnnlab.data.splits import split
from cnnlab.data.store import PixelStore
from cnnlab.evaluate import evaluate
from cnnlab.predict import predict
from cnnlab.train import engine

# Four predictions over three classes, two bins: [0, 0.5) holds a right one at 0.40 and a wrong one at 0.45,
# [0.5, 1] a right one at 0.9 and a wrong one at 0.8.
HAND = torch.tensor([[0.40, 0.30, 0.30], [0.30, 0.45, 0.25], [0.90, 0.05, 0.05], [0.10, 0.80, 0.10]])
HAND_LABELS = torch.tensor([0, 0, 0, 0])


def test_ece_and_mce_by_hand():
    c = calibration(HAND.log(), HAND_LABELS, bins=2)
    low, high = abs(0.5 - (0.40 + 0.45) / 2), abs(0.5 - (0.9 + 0.8) / 2)  # 0.075 and 0.35
    assert c["ece"] == pytest.approx(0.5 * low + 0.5 * high, abs=1e-6)  # 0.2125
    assert c["mce"] == pytest.approx(high, abs=1e-6)
    assert [(b["count"], b["accuracy"]) for b in c["bins"]] == [(2, 0.5), (2, 0.5)]
    assert c["bins"][0]["confidence"] == pytest.approx(0.425) and c["bins"][1]["confidence"] == pytest.approx(0.85)


def test_nll_and_brier_against_their_formulas():
    torch.manual_seed(0)
    z, y = torch.randn(50, 4) * 3, torch.randint(0, 4, (50,))
    c = calibration(z, y, temperature=2.0)
    p = (z.double() / 2).softmax(1)
    assert c["nll"] == pytest.approx(-p[torch.arange(50), y].log().mean().item(), rel=1e-9)
    brier = sum(((p[i] - F.one_hot(y[i], 4).double()) ** 2).sum().item() for i in range(50)) / 50
    assert c["brier"] == pytest.approx(brier, rel=1e-9)


def test_reliability_bins_add_up_to_torchmetrics_ece():
    torch.manual_seed(1)
    z, y = torch.randn(300, 10) * 4, torch.randint(0, 10, (300,))
    p = z.softmax(1)
    bins = reliability(p, y)
    assert sum(b["count"] for b in bins) == 300 and len(bins) == 15
    gaps = sum(b["count"] / 300 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    expected = multiclass_calibration_error(p, y, 10, n_bins=15, norm="l1").item()
    assert gaps == pytest.approx(expected, abs=1e-5)
    assert calibration(z, y)["ece"] == pytest.approx(expected, abs=1e-6)


def calibrated_toy(n=4000, k=10, seed=0):
    """Logits and labels drawn from their own softmax: a perfectly calibrated model's."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 2
    y = torch.multinomial(z.softmax(1), 1, generator=g)[:, 0]
    return z, y


def test_temperature_scaling_undoes_over_confidence():
    z, y = calibrated_toy()
    over = z * 5  # an over-confident model: the same ranking, five times the logits
    t = fit_temperature(over, y)
    assert t == pytest.approx(5, rel=0.05)
    assert calibration(over, y, t)["nll"] < calibration(over, y)["nll"] - 0.5
    assert calibration(over, y, t)["ece"] < calibration(over, y)["ece"] / 3
    assert fit_temperature(z, y) == pytest.approx(1, rel=0.05)  # a calibrated model is left alone


def test_bootstrap_interval_holds_the_accuracy_and_is_deterministic():
    right = torch.tensor([1] * 300 + [0] * 100)
    lo, hi = bootstrap_interval(right)
    assert (lo, hi) == bootstrap_interval(right)
    se = math.sqrt(0.75 * 0.25 / 400)  # the normal approximation the percentile interval should be near
    assert lo < 0.75 < hi
    assert lo == pytest.approx(0.75 - 1.96 * se, abs=0.01) and hi == pytest.approx(0.75 + 1.96 * se, abs=0.01)


def test_precision_recall_f1_and_top5_against_torchmetrics():
    torch.manual_seed(2)
    z, y = torch.randn(200, 8), torch.randint(0, 8, (200,))
    z[:, 7] -= 100  # class 7 is never predicted: its precision and F1 are 0, as torchmetrics counts them
    classes = [f"c{i}" for i in range(8)]
    got = classification(z, y, classes)
    for name, f in (("precision", multiclass_precision), ("recall", multiclass_recall), ("f1", multiclass_f1_score)):
        expected = f(z, y, 8, average=None).tolist()
        assert [got["per_class_figures"][c][name] for c in classes] == pytest.approx(expected, abs=1e-6), name
    assert got["per_class_figures"]["c7"]["precision"] == 0
    top5 = (z.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    assert got["top5"] == pytest.approx(top5)
    assert classification(z[:, :5], y % 5, classes[:5])["top5"] is None  # not more than 5 classes


# --- a trained run ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    run_dir = engine.train(tiny(tmp_path_factory.mktemp("calibrate") / "run", width=4, epochs=1)).run_dir
    result = evaluate(run_dir, device="cpu", calibrate=True)
    return run_dir, result


def test_validation_set_is_the_one_training_held_out(calibrated_run):
    run_dir, _ = calibrated_run
    loaded = run.load(run_dir)
    x, y = loaded.validation_set()
    cfg = loaded.config
    held = split(open_dataset("sample"), cfg.limit_train, cfg.limit_test, cfg.val_split, cfg.batch_size)
    assert len(y) == cfg.val_split == 64
    expected = held.val_x.read() if isinstance(held.val_x, PixelStore) else held.val_x
    assert torch.equal(x, expected) and torch.equal(y, held.val_y)


def test_calibrate_fits_on_validation_and_keeps_the_temperature_in_the_run(calibrated_run):
    run_dir, result = calibrated_run
    loaded = run.load(run_dir)
    x, y = loaded.validation_set()
    val = score(loaded.model, x, y, loaded.preprocess, tta=loaded.tta)
    t = fit_temperature(val.logits, val.labels)
    saved = json.loads((run_dir / "calibration.json").read_text())
    assert saved["temperature"] == pytest.approx(t) == pytest.approx(loaded.temperature)
    assert saved["stamp"] == run.checkpoint_stamp(loaded.path)
    assert saved["nll_after"] <= saved["nll_before"]
    assert saved["nll_before"] == pytest.approx(F.cross_entropy(val.logits.double(), y).item(), rel=1e-6)
    assert result["fitted"]["temperature"] == saved["temperature"] and result["temperature"] == saved["temperature"]
    # The test set's figures before and after, from the test logits; top-1 is unchanged by T.
    test = score(loaded.model, *loaded.test_set(), loaded.preprocess, tta=loaded.tta)
    assert result["calibration"]["nll"] == pytest.approx(test.loss, rel=1e-5)
    assert result["calibrated"]["nll"] == pytest.approx(calibration(test.logits, test.labels, t)["nll"], rel=1e-9)
    assert result["top1"] == test.top1
    lo, hi = result["top1_interval"]
    assert lo <= result["top1"] <= hi
    assert (run_dir / "eval" / "reliability.png").stat().st_size > 10_000


def test_evaluate_json_carries_every_figure(calibrated_run, capsys):
    run_dir, result = calibrated_run
    assert cli.main(["evaluate", str(run_dir), "--json", "--device", "cpu"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("top1_interval", "top5", "per_class_figures", "calibration", "temperature", "calibrated"):
        assert doc[key] == json.loads(json.dumps(result[key])), key
    assert doc["fitted"] is None  # this time nothing was fitted: the kept temperature was used
    assert set(doc["calibration"]) == {"ece", "mce", "nll", "brier", "bins"}


def test_predict_divides_the_logits_by_the_kept_temperature(calibrated_run, capsys):
    run_dir, _ = calibrated_run
    loaded = run.load(run_dir)
    t = loaded.temperature
    images, _ = loaded.test_set()
    folder = run_dir.parent / "images"
    folder.mkdir(exist_ok=True)
    from PIL import Image
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(folder / "0.png")
    (entry,) = predict(run_dir, folder / "0.png", top_k=10, device="cpu")
    with torch.no_grad():
        z = model_logits(loaded.model, loaded.preprocess.to_input(images[:1]), loaded.tta)
    expected = (z / t).softmax(1)[0]
    assert entry["temperature"] == t
    assert [p["prob"] for p in entry["top"]] == pytest.approx(expected.sort(descending=True).values.tolist(), abs=1e-5)
    assert cli.main(["predict", str(run_dir), str(folder / "0.png")]) == 0
    assert f"(temperature {t:.3f})" in capsys.readouterr().out


def test_a_changed_checkpoint_has_no_temperature(calibrated_run, tmp_path):
    run_dir, _ = calibrated_run
    loaded = run.load(run_dir)
    assert loaded.temperature is not None
    st = loaded.path.stat()
    try:
        os.utime(loaded.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert run.load(run_dir).temperature is None
    finally:
        os.utime(loaded.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run.load(run_dir).temperature == loaded.temperature


def test_the_report_shows_evaluates_calibration_figures(calibrated_run):
    from cnnlab.inspect import Inspection
    from cnnlab.report import page, sections

    run_dir, result = calibrated_run
    inspection = Inspection.open(run_dir, device="cpu")
    contents = sections.Contents(run_dir, {}, [], [], 0, inspection.run.path, None, inspection.classes)
    sections._score_test(contents, inspection)
    f = contents.test.figures
    for key in ("calibration", "calibrated", "temperature", "top1_interval", "top5", "per_class_figures"):
        assert json.loads(json.dumps(f[key])) == json.loads(json.dumps(result[key])), key
    html = page._calibration(contents)
    t = result["temperature"]
    assert f"divided by the temperature {t:.3f}" in html and f"temperature {t:.3f}</th>" in html
    for c in (result["calibration"], result["calibrated"]):
        assert f"{100 * c['ece']:.2f}%" in html and f"{c['nll']:.4f}" in html and f"{c['brier']:.4f}" in html
    assert contents.test.reliability.uri.startswith("data:image/png;base64,")
    # The misclassified images' probabilities are the calibrated ones.
    wrong = contents.test.wrong[0]
    images, _ = inspection.test_set()
    with torch.no_grad():
        z = model_logits(inspection.model, inspection.preprocess.to_input(images[wrong.index:wrong.index + 1]),
                         inspection.run.tta)
    assert wrong.prob == pytest.approx((z / t).softmax(1).max().item(), abs=1e-5)


def test_the_explorer_predicts_with_the_kept_temperature_and_says_so(calibrated_run):
    from starlette.testclient import TestClient

    from cnnlab.serve import load_runs
    from cnnlab.serve.app import create_app
    from cnnlab.serve.jobs import Jobs

    run_dir, result = calibrated_run
    served = load_runs([run_dir], jobs=Jobs(idle=3.0))
    with TestClient(create_app(served), base_url="http://127.0.0.1:8000") as client:
        got = client.get("/api/0/predict?image=t0-0").json()
    loaded = run.load(run_dir)
    images, _ = loaded.test_set()
    with torch.no_grad():
        z = model_logits(loaded.model, loaded.preprocess.to_input(images[:1]), loaded.tta)
    expected = (z / result["temperature"]).softmax(1)[0].sort(descending=True).values[:5]
    assert got["temperature"] == result["temperature"]
    assert [t["prob"] for t in got["top"]] == pytest.approx(expected.tolist(), abs=1e-5)
