"""predict: the same answers as evaluate for real test images, any format and mode, and bad files named."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import run
from cnnlab.cli import main
from cnnlab.core.metrics import score
from cnnlab.data import load_dataset
from cnnlab.data.splits import reported_test_set
from cnnlab.predict import predict

PICKS = list(range(0, 200, 20))  # ten reported test images, one of every class of the sample


@pytest.fixture(scope="module")
def reference(small_run):
    """The reported test images and what ``evaluate`` scores them as: predictions and probabilities."""
    loaded = run.load(small_run)
    images, labels = reported_test_set(load_dataset("sample"), loaded.config.limit_test)
    assert loaded.config.tta  # the fast recipe scores with flip TTA: predict must too
    scores = score(loaded.model, images, labels, loaded.preprocess, tta=True)
    with torch.no_grad():
        x = loaded.preprocess.to_input(images)
        probs = torch.softmax((loaded.model(x) + loaded.model(x.flip(-1))) / 2, 1)
    assert torch.equal(probs.argmax(1), scores.predictions)
    return images, scores.predictions, probs, loaded.classes


def pil(images, i):
    return Image.fromarray(images[i].permute(1, 2, 0).numpy())


def same(a, b, tol=1e-6):
    """Two top-k lists agree: the same labels in the same order, probabilities within ``tol``."""
    return [t["label"] for t in a] == [t["label"] for t in b] and \
        [t["prob"] for t in a] == pytest.approx([t["prob"] for t in b], abs=tol)


def test_known_test_images_are_predicted_as_in_evaluate(small_run, reference, tmp_path):
    images, predictions, probs, classes = reference
    assert len(set(predictions[PICKS].tolist())) > 1, "the model predicts a single class; the check would be weak"
    files = []
    for i in PICKS:
        files.append(tmp_path / f"test-{i:03d}.png")
        pil(images, i).save(files[-1])
    results = predict(small_run, files, top_k=3, device="cpu")
    assert [r["image"] for r in results] == [str(f) for f in files]
    for i, r in zip(PICKS, results):
        top = r["top"]
        assert len(top) == 3 and top[0]["prob"] >= top[1]["prob"] >= top[2]["prob"]
        assert top[0]["label"] == classes[predictions[i]]
        expected = probs[i].topk(3)
        assert [t["label"] for t in top] == [classes[j] for j in expected.indices]
        assert [t["prob"] for t in top] == pytest.approx(expected.values.tolist(), abs=1e-5)
    # Without the flips: the single view's probabilities.
    loaded = run.load(small_run)
    with torch.no_grad():
        plain = torch.softmax(loaded.model(loaded.preprocess.to_input(images[PICKS])), 1)
    for r, p in zip(predict(small_run, files, top_k=1, device="cpu", tta=False), plain):
        assert r["top"][0]["prob"] == pytest.approx(p.max().item(), abs=1e-5)


def test_folder_with_a_text_file_predicts_the_images_and_names_the_bad_file(small_run, reference, tmp_path, capsys):
    images, predictions, _, classes = reference
    i, j = PICKS[1], PICKS[2]
    folder = tmp_path / "photos"
    (folder / "nested" / "deeper").mkdir(parents=True)
    pil(images, i).save(folder / "a.png")
    pil(images, i).save(folder / "b.jpg", quality=95)
    pil(images, i).convert("CMYK").save(folder / "nested" / "c.tiff")  # PIL's CMYK round trip is exact
    pil(images, i).convert("RGBA").save(folder / "nested" / "d.png")
    pil(images, i).convert("P").save(folder / "nested" / "e.gif")
    gray = pil(images, j).convert("L")
    gray.save(folder / "nested" / "f-gray8.png")
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(folder / "nested" / "g-gray16.png")
    # 3× nearest-neighbour enlargement in a wider frame: the centre crop and the bilinear resize give back
    # exactly the original pixels (the resize samples the centre of every 3×3 block).
    big = Image.new("RGB", (128, 96), (255, 0, 0))
    big.paste(pil(images, j).resize((96, 96), Image.Resampling.NEAREST), (16, 0))
    big.save(folder / "nested" / "deeper" / "h-large.png")
    (folder / "nested" / "notes.txt").write_text("not an image")

    assert main(["predict", str(small_run), str(folder), "--json", "--top-k", "3"]) == 1
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert err.strip().splitlines() == [f"cnnlab predict: {folder / 'nested' / 'notes.txt'}: not an image PIL can read"]
    by_name = {r["image"].rsplit("/", 1)[1]: r["top"] for r in doc}
    assert sorted(by_name) == ["a.png", "b.jpg", "c.tiff", "d.png", "e.gif", "f-gray8.png", "g-gray16.png",
                               "h-large.png"]
    assert all(set(r) == {"image", "top", "temperature"} and len(r["top"]) == 3 for r in doc)
    assert all(r["temperature"] is None for r in doc)  # no temperature fitted: the plain softmax
    assert all(set(t) == {"label", "prob"} and 0 <= t["prob"] <= 1 for r in doc for t in r["top"])
    label = classes[predictions[i]]
    for name in ("a.png", "c.tiff", "d.png"):  # lossless: exactly the evaluated pixels
        assert same(by_name[name], by_name["a.png"]), name
        assert by_name[name][0]["label"] == label
    assert same(by_name["g-gray16.png"], by_name["f-gray8.png"])  # 16-bit rescaled, not clipped
    assert by_name["h-large.png"][0]["label"] == classes[predictions[j]]


def test_every_file_good_exits_0_and_prints_one_line_each(small_run, reference, tmp_path, capsys):
    images, predictions, _, classes = reference
    pil(images, PICKS[3]).save(tmp_path / "x.png")
    assert main(["predict", str(small_run / "checkpoints" / "last.pt"), str(tmp_path / "x.png"), "--top-k", "50"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    line, = out.splitlines()
    assert line.startswith(f"{tmp_path / 'x.png'}  {classes[predictions[PICKS[3]]]} ")
    assert line.count("%") == len(classes)  # --top-k above the number of classes shows them all


@pytest.mark.parametrize("argv, words", [
    (["--top-k", "0"], ["--top-k"]),
])
def test_user_mistakes_are_one_line_and_exit_2(small_run, tmp_path, capsys, argv, words):
    (tmp_path / "x.txt").write_text("x")
    assert main(["predict", str(small_run), str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_a_missing_run_is_a_user_error(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "no-run"), str(tmp_path)]) == 2
    assert "no-run" in capsys.readouterr().err
