"""``cnnlab visualize sanity``: each check against its definition, computed here, and the command end to end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.cli import main
from cnnlab.inspect.registry import explainers
from cnnlab.models import build
from cnnlab.viz import sanity as checks
from cnnlab.viz.sanity import (
    BASELINE,
    Explainer,
    deletion_insertion,
    gaussian_blur,
    impute,
    randomised,
    road,
    sanity_checks,
    spearman,
    train_on_permuted_labels,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()


def test_spearman_with_ties_worked_out_by_hand():
    # a = (1, 2, 2, 3) ranks (1, 2.5, 2.5, 4); b = (10, 30, 20, 40) ranks (1, 3, 2, 4). Centred (mean 2.5):
    # (−1.5, 0, 0, 1.5) and (−1.5, .5, −.5, 1.5): r = 4.5 / √(4.5 · 5).
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    b = torch.tensor([[10.0, 30.0, 20.0, 40.0]])
    torch.testing.assert_close(spearman(a, b), torch.tensor([4.5 / math.sqrt(4.5 * 5)], dtype=torch.float64))
    # Any increasing transform keeps the order; reversing it gives −1.
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(spearman(x, x.pow(3) + 7), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(spearman(x, -x.exp()), -torch.ones(3, dtype=torch.float64))
    # A constant map has no order: it agrees with another constant map and with nothing else.
    flat = torch.zeros(1, 50, dtype=torch.float64)
    assert spearman(flat, flat).tolist() == [1.0] and spearman(flat, x[:1]).tolist() == [0.0]


def test_spearman_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 6, (4, 40), generator=g).double()  # many ties
    b = a + torch.randint(0, 4, (4, 40), generator=g).double()
    expected = [stats.spearmanr(u.numpy(), v.numpy()).statistic for u, v in zip(a, b)]
    torch.testing.assert_close(spearman(a, b), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_randomised_re_initialises_exactly_the_layers_named():
    model = build("resnet18-cifar", num_classes=10, width=4).eval()
    with torch.no_grad():  # as if trained: batch norms' weights, biases and statistics away from their start
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    broken = randomised(model, ["fc", "conv5_x"], seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched
    for key, value in broken.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        changed = not torch.equal(value, before[key])
        assert changed == key.startswith(("fc.", "layer4.")), key
    again = randomised(model, ["fc", "conv5_x"], seed=3)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in broken.state_dict().items())
    assert not broken.training


def test_deletion_and_insertion_curves_by_their_definition():
    """Pixel k of the ordering removed (set to 0) or inserted (into the blurred image) at step ⌈…⌉: probabilities
    of the class after each step, and the trapezoid area under them."""
    model = tiny_cnn()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    importance = torch.randperm(32, generator=torch.Generator().manual_seed(3)).double().view(2, 4, 4)  # no ties
    target = torch.tensor([0, 2])
    steps = 8
    got = deletion_insertion(model, x, importance, target, steps=steps, blur_sigma=1.0)
    blurred = gaussian_blur(x, 1.0)
    for i in range(2):
        order = importance[i].flatten().argsort(descending=True)
        deletion, insertion = [], []
        for k in range(steps + 1):
            chosen = torch.zeros(16, dtype=torch.bool)
            chosen[order[:round(k * 16 / steps)]] = True
            chosen = chosen.view(4, 4)
            removed = torch.where(chosen, 0.0, x[i])
            inserted = torch.where(chosen, x[i], blurred[i])
            with torch.no_grad():
                deletion.append(model(removed[None]).softmax(1)[0, target[i]])
                insertion.append(model(inserted[None]).softmax(1)[0, target[i]])
        torch.testing.assert_close(got.deletion[i], torch.stack(deletion))
        torch.testing.assert_close(got.insertion[i], torch.stack(insertion))
        torch.testing.assert_close(got.deletion_auc[i], torch.trapezoid(torch.stack(deletion), dx=1 / steps))
        torch.testing.assert_close(got.insertion_auc[i], torch.trapezoid(torch.stack(insertion), dx=1 / steps))


def test_gaussian_blur_of_an_impulse_is_the_normalised_gaussian():
    x = torch.zeros(1, 2, 21, 21, dtype=torch.float64)
    x[0, :, 10, 10] = 1
    sigma = 1.5
    t = torch.arange(-10, 11, dtype=torch.float64)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g[t.abs() > math.ceil(3 * sigma)] = 0  # the kernel is cut at 3σ and normalised
    expected = torch.outer(g, g) / g.sum() ** 2
    blurred = gaussian_blur(x, sigma)
    torch.testing.assert_close(blurred[0, 0], expected)
    torch.testing.assert_close(blurred[0, 1], expected)
    torch.testing.assert_close(gaussian_blur(torch.full((1, 1, 5, 5), 0.3), 2.0), torch.full((1, 1, 5, 5), 0.3))


def test_imputation_solves_rong_et_al_s_linear_system():
    """Each removed pixel is the weighted mean of its in-image neighbours (1/6 direct, 1/12 diagonal): solved
    here as one dense system per channel."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 7, 6, generator=g, dtype=torch.float64)
    removed = torch.rand(2, 1, 7, 6, generator=g) < 0.6
    removed[:, :, 0, 0] = False  # one pixel kept at least
    got = impute(x, removed, noise=0.0, tolerance=1e-12)
    weights = {(dy, dx): (1 / 6 if dy == 0 or dx == 0 else 1 / 12)
               for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)}
    for b in range(2):
        holes = [(r, c) for r in range(7) for c in range(6) if removed[b, 0, r, c]]
        index = {p: k for k, p in enumerate(holes)}
        a = torch.zeros(len(holes), len(holes), dtype=torch.float64)
        rhs = torch.zeros(len(holes), 3, dtype=torch.float64)
        for (r, c), k in index.items():
            for (dy, dx), w in weights.items():
                n = (r + dy, c + dx)
                if not (0 <= n[0] < 7 and 0 <= n[1] < 6):
                    continue
                a[k, k] += w
                if n in index:
                    a[k, index[n]] -= w
                else:
                    rhs[k] += w * x[b, :, n[0], n[1]]
        solution = torch.linalg.solve(a, rhs)
        expected = x[b].clone()
        for (r, c), k in index.items():
            expected[:, r, c] = solution[k]
        torch.testing.assert_close(got[b], expected, rtol=0, atol=1e-9)


def test_imputation_noise_is_on_the_removed_pixels_only():
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    removed = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    removed[..., 16:48, 16:48] = True
    quiet = impute(x, removed, noise=0.0)
    noisy = impute(x, removed, noise=0.01, seed=1)
    kept = ~removed.expand_as(x)
    assert torch.equal(noisy[kept], x[kept])
    spread = (noisy - quiet)[~kept].std()  # 3 × 1024 draws: within 10% of σ by far
    assert 0.009 < float(spread) < 0.011


def test_road_removes_the_most_and_the_least_relevant_pixels():
    model = tiny_cnn()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    importance = torch.randperm(72, generator=torch.Generator().manual_seed(7)).double().view(2, 6, 6)
    target = torch.tensor([1, 0])
    fractions = [0.25, 0.5]
    got = road(model, x, importance, target, fractions=fractions, noise=0.0)
    for i in range(2):
        order = importance[i].flatten().argsort(descending=True)
        for k, f in enumerate(fractions):
            count = round(f * 36)
            for field, picked in (("morf", order[:count]), ("lerf", order[-count:])):
                mask = torch.zeros(36, dtype=torch.bool)
                mask[picked] = True
                imputed = impute(x[i:i + 1], mask.view(1, 1, 6, 6), noise=0.0)
                with torch.no_grad():
                    p = model(imputed).softmax(1)[0, target[i]]
                torch.testing.assert_close(getattr(got, field)[i, k], p, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got.score, ((got.lerf - got.morf) / 2).mean(1))


def test_train_on_permuted_labels_learns_from_the_permutation_only():
    model = tiny_cnn().float()
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    labels = torch.arange(40) % 3
    before = [p.clone() for p in model.parameters()]
    trained = train_on_permuted_labels(model, images, labels, lambda u: u.float() / 255, epochs=2, batch_size=8)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the checked model is untouched
    assert not trained.training
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), before))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = build("resnet18-cifar", num_classes=10, width=4).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_a_map_that_ignores_the_model_fails_and_grad_cam_does_not(net):
    """Adebayo et al.'s point: an edge detector makes a plausible saliency map and stays the same whatever the
    weights. The cascade must catch it, and must not catch Grad-CAM, which reads the classifier's weights."""
    model, x = net

    def edges(model, x, *, target=None, layer=None, channels=None):  # vertical differences, whatever the model
        return F.pad((x[..., 1:, :] - x[..., :-1, :]).abs().sum(1, keepdim=True), (0, 0, 0, 1))

    checked = {"edges": Explainer(edges, cam=True), **explainers(["grad-cam"])}
    result = sanity_checks(model, x, checked, layers=["fc"], deletion_steps=4, road_fractions=[0.5])
    assert result.layers == ["fc", "conv5_x", "conv1"] and result.judged == "conv5_x"
    for step in result.layers:  # identical maps: ρ = 1 up to the rounding of a float64 correlation
        torch.testing.assert_close(torch.tensor(result.methods["edges"].randomisation[step], dtype=torch.float64),
                                   torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert "model randomisation" in result.verdict("edges")
    assert result.methods["grad-cam"].rho("conv5_x") < 0.5
    assert result.checks("grad-cam")["model randomisation"] == "passes"
    assert result.checks("grad-cam")["data randomisation"] == "not run"
    assert result.baseline.rho("conv1") > 1 - 1e-12  # the random map ignores the model too
    assert len(result.maps["grad-cam"]) == 1 + 3
    document = json.loads(json.dumps(result.to_json()))
    assert set(document["methods"]) == {"edges", "grad-cam"}
    assert document["settings"]["judged_at"] == "conv5_x"


def test_beating_the_baseline_takes_two_standard_errors():
    compare = checks.compare
    assert compare([0.5, 0.6, 0.55], [0.1, 0.2, 0.15], higher=True) == "passes"
    # Differences (.4, −.1, .4): mean .233, standard error .167; better, but not by two standard errors.
    assert compare([0.5, 0.1, 0.55], [0.1, 0.2, 0.15], higher=True) == "unclear"
    assert compare([0.1, 0.2], [0.3, 0.41], higher=False) == "passes"
    assert compare([0.1], [0.3], higher=False) == "unclear"  # one image proves nothing
    assert compare([0.1, 0.1], [0.2, 0.3], higher=True) == "fails"
    assert compare([0.2, 0.3], [0.2, 0.3], higher=True) == "fails"  # no better is not better


def test_the_command_prints_the_table_and_writes_the_figure(small_run, capsys):
    argv = ["visualize", "sanity", str(small_run), "--count", "2", "--kind", "grad-cam", "saliency", "--layer", "fc",
            "--random-labels", str(small_run)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["method", "rand.", "ρ", "labels", "ρ", "deletion"]
    assert [line.split()[0] for line in lines[2:5]] == ["grad-cam", "saliency", BASELINE.split()[0]]
    # The "model trained on permuted labels" given is the model itself: its maps are the same maps.
    assert "fails data randomisation" in lines[2] and "fails data randomisation" in lines[3]
    assert f"wrote {small_run / 'viz' / 'sanity' / 'cascade.png'}" in out
    document = json.loads((small_run / "viz" / "sanity" / "sanity.json").read_text())
    assert document["images"] == ["test0", "test199"]
    assert document["methods"]["grad-cam"]["random_labels_rho"] > 1 - 1e-12

    assert main(argv[:-2] + ["--random-labels", "none", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["images"] == ["test0", "test199"]
    assert document["methods"]["saliency"]["random_labels_rho"] is None
    assert list(document["methods"]["saliency"]["randomisation_rho"]) == ["fc", "conv5_x", "conv1"]
    assert set(document["baseline"]) >= {"deletion_auc", "insertion_auc", "road"}


@pytest.mark.parametrize("argv, words", [
    (["--kind", "lime"], ["unknown --kind 'lime' for sanity", "grad-cam", "occlusion"]),
    (["--layer", "pool"], ["--layer 'pool' cannot be a randomisation step", "fc", "conv1"]),
    (["--layer", "conv9_x"], ["unknown layer 'conv9_x'"]),
    (["--target", "cat"], ["sanity does not use --target"]),
    (["--steps", "3"], ["sanity does not use --steps"]),
    (["--count", "0"], ["--count must be at least 1"]),
    (["--random-labels", "MISSING"], ["does not exist"]),
    (["--random-labels", "-1"], ["--random-labels -1 is not a number of epochs", "run trained on permuted"]),
])
def test_sanity_mistakes_are_one_line_and_exit_2(small_run, tmp_path, capsys, argv, words):
    argv = [str(tmp_path / "nothing") if a == "MISSING" else a for a in argv]
    assert main(["visualize", "sanity", str(small_run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_json_and_random_labels_are_for_sanity_alone(small_run, capsys):
    assert main(["visualize", "cam", str(small_run), "--json"]) == 2
    assert "--json is for cnnlab visualize sanity" in capsys.readouterr().err
