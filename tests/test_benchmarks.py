"""The benchmark code at tiny sizes: it runs, its JSON has the promised shape, and the two input
pipelines it compares make the same normalised batches."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import assignment, cpu, pipeline, recipe, run_record
from cnnlab.core.transforms import to_input

TINY = cpu.Settings(dataset="synthetic", width=4, image_size=64, batch_size=8, pipeline_warmup=1,
                    pipeline_batches=2, pipeline_rounds=2, train_warmup=1, train_steps=1,
                    variants=("assignment", "cnnlab", "cnnlab bf16"))


def test_cpu_benchmark_document(tmp_path):
    document = cpu.run(TINY, fresh_process=False, progress=lambda line: None)
    path = cpu.report.write_json(document, "cpu.json", tmp_path)
    loaded = json.loads(path.read_text())
    assert {"date", "cpu", "cores", "torch", "load_average"} <= set(loaded["machine"])
    # Which kernels the figures came from: torch's choice, and the CPU's flags that bear on it.
    capability, flags = loaded["machine"]["cpu_capability"], loaded["machine"]["cpu_flags"]
    assert capability == torch.backends.cpu.get_cpu_capability() and set(flags) <= set(cpu.report.CPU_FLAGS)
    if flags and capability in ("AVX2", "AVX512"):  # torch uses no wider kernels than the CPU has
        assert {"AVX512": "avx512f", "AVX2": "avx2"}[capability] in flags
    assert [r["name"] for r in loaded["pipeline"]] == list(TINY.pipelines)
    assert [r["name"] for r in loaded["training"]] == list(TINY.variants)
    for row in loaded["pipeline"] + loaded["training"]:
        assert "error" not in row, row
        assert row["host_rss_peak_mb"] > 0 and row["children_rss_peak_mb"] >= 0
        assert row["speedup"] > 0
    assert loaded["pipeline"][0]["speedup"] == 1 and len(loaded["pipeline"][0]["runs"]) == 2
    assert all(r["images_per_s"] > 0 for r in loaded["training"])
    assert "× assignment" in cpu.tables(loaded)
    # Which CPU the bf16 rows were measured on, in the JSON and above the table.
    assert loaded["cpu_bf16"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert loaded["cpu_bf16"]["model"] == loaded["machine"]["cpu"]
    native = "bf16 native" if loaded["cpu_bf16"]["bf16_native"] else "bf16 not native"
    assert f"torch CPU kernels {loaded['cpu_bf16']['capability']}, {native}" in cpu.tables(loaded)


def test_bf16_rows_are_left_out_where_bf16_is_emulated():
    rows = ("assignment", "cnnlab", "cnnlab bf16", "cnnlab channels-last bf16", "cnnlab compile")
    assert cpu.without_emulated_bf16(rows, bf16_native=True) == (rows, [])
    assert cpu.without_emulated_bf16(rows, bf16_native=False) == (
        ("assignment", "cnnlab", "cnnlab compile"), ["cnnlab bf16", "cnnlab channels-last bf16"])
    document = {"dataset": "synthetic", "load_average_after": [0.0],
                "machine": {"date": "d", "cpu": "c", "cores": 2, "torch": "t", "load_average": [0.0]},
                "cpu_bf16": {"capability": "AVX2", "bf16_native": False, "bf16_flags": [], "model": "c"},
                "skipped_bf16": ["cnnlab bf16"]}
    head = cpu.tables(document)
    assert "torch CPU kernels AVX2, bf16 not native" in head and "left out" in head and "cnnlab bf16" in head


def test_recipe_ablation_document(tmp_path, monkeypatch):
    monkeypatch.delenv("CNNLAB_CIFAR10_JPEG", raising=False)  # the bundled sample, whatever the machine has
    monkeypatch.setenv("CNNLAB_CPU_BF16", "0")  # as on a CPU without bf16: bf16 is not the default
    assert recipe.main(["--width", "4", "--epochs", "1", "--limit-train", "600", "--variants", "fast recipe",
                        "EMA 0.98", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]) == 0
    [path] = tmp_path.glob("recipe-cpu-*.json")
    document = json.loads(path.read_text())
    assert document["dataset"] == "sample"
    assert document["base"]["amp"] is False
    assert all(row["amp"]["used"] == "fp32" and row["amp"]["asked"] == "off" for row in document["rows"])
    plain, averaged = document["rows"]
    assert plain["settings"]["ema"] == 0.0 and averaged["settings"]["ema"] == 0.98
    assert plain["settings"]["width"] == 4 and plain["n_val"] == 60 and plain["n_test"] == 1000
    for row in document["rows"]:
        for key in ("val", "val_tta", "test", "test_tta"):
            assert 0 <= row[key] <= 100
            # Whole images right: a percentage of 60 or 1,000 images.
            n = row["n_val"] if key.startswith("val") else row["n_test"]
            assert abs(row[key] * n / 100 - round(row[key] * n / 100)) < 1e-6
    scored = json.loads((tmp_path / "runs" / "EMA-0.98" / "metrics.jsonl").read_text().splitlines()[-1])
    assert scored["test_acc"] * 100 == pytest.approx(averaged["test"])  # the run's own score, without TTA


def test_the_airbench_rows_change_one_part_each(tmp_path):
    from cnnlab.config import resolve

    base = {"dataset": "sample", "device": "cpu", "width": None, "epochs": 10, "limit_train": None, "amp": False,
            "seed": 0}
    fast, airbench = (recipe.variant_config(recipe.VARIANTS[name], base, tmp_path)
                      for name in ("fast recipe", "airbench recipe"))
    assert (fast.model, fast.width, airbench.model, airbench.width) == ("resnet18-cifar", 16, "airbench94", 64)
    assert airbench.to_dict() == {**resolve("airbench").to_dict(), "dataset": "sample", "device": "cpu", "epochs": 10,
                                  "amp": False, "out": str(tmp_path), "tta": False}
    for name in recipe.AIRBENCH_ROWS[2:]:
        changes = recipe.VARIANTS[name]
        against = airbench if changes.get("recipe") == "airbench" else fast
        cfg = recipe.variant_config(changes, base, tmp_path).to_dict()
        differ = {k for k, v in cfg.items() if v != against.to_dict()[k]}
        assert differ == set(changes) - {"recipe"}, name
    assert recipe.variant_config(recipe.VARIANTS["airbench, 4-px zero-padded crops"], base, tmp_path).translate is None


def test_the_anchors_rates_are_airbench94s():
    from benchmarks import airbench_anchor
    from cnnlab.models import build

    model = build("airbench94", width=8)
    norm_biases, others = airbench_anchor.optimiser(model, 1024).param_groups
    kilostep = 1024 * (1 + 1 / 0.15)
    assert others["lr"] == pytest.approx(11.5 / kilostep) and norm_biases["lr"] == pytest.approx(64 * 11.5 / kilostep)
    for group in (norm_biases, others):  # decoupled: the same decay per step, 0.0153 per 1,024 images
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.0153 * 1024 / kilostep)
    assert len(norm_biases["params"]) == 6 and all(p.ndim == 1 for p in norm_biases["params"])
    assert any(p is model.whiten[0].bias for p in others["params"])


def test_decay_weights_only_leaves_batchnorm_and_biases_undecayed(monkeypatch):
    from cnnlab.models import build, transfer

    monkeypatch.setattr(transfer, "param_groups", transfer.param_groups)  # restored after the test
    recipe._decay_weights_only()
    model = build("resnet18-cifar", num_classes=10, width=4)
    groups = transfer.param_groups(model, 0.4)
    decayed, undecayed = groups
    assert "weight_decay" not in decayed and undecayed["weight_decay"] == 0.0  # the optimizer's default, and none
    assert all(p.ndim == 4 or p.ndim == 2 for p in decayed["params"])
    norms = [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    assert {id(p) for p in undecayed["params"]} == {id(p) for p in norms} | {id(model.fc.bias)}
    optimizer = torch.optim.SGD(groups, lr=0.4, weight_decay=5e-4)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]


def test_run_record_counts_a_resumed_epoch_once(small_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("viz", "eval*", "explore"))
    [epoch] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "epoch"]
    with (run / "metrics.jsonl").open("a") as f:  # as a run resumed before its epoch's end writes it again
        f.write(json.dumps({**epoch, "seconds": 2.5}) + "\n")
    assert run_record.main([str(run), "record.json", "--device", "cpu", "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "record.json").read_text())
    assert document["epochs_done"] == 1 and document["train_seconds"] == 2.5
    # The run scored itself with flip TTA (the fast recipe): the same weights score the same again.
    assert document["test_acc_tta"] == pytest.approx(epoch["test_acc"], abs=1e-12)
    assert 0 <= document["test_acc_plain"] <= 1 and document["data"]["test"] == 200
    # ... and it is also scored with airbench's six views, as its own `evaluate --tta translate` scores it.
    six = json.loads((run / "eval-six" / "metrics.json").read_text())
    assert document["scores"]["six"]["top1"] == six["top1"] and six["tta"] == "translate"
    assert document["scores"]["six"]["views"] == run_record.VIEWS["translate"]
    assert document["config"]["width"] == 8 and document["curve"][0]["epoch"] == 1


def test_time_to_a_target_counts_training_seconds_to_the_first_epoch_that_reached_it():
    curve = [{"seconds": 10.0, "test_acc": 0.5}, {"seconds": 12.5, "test_acc": 0.885},
             {"seconds": 11.0, "test_acc": 0.87}, {"seconds": 9.0, "test_acc": 0.94}]
    assert run_record.time_to(curve) == {"0.88": 22.5, "0.94": 42.5}
    assert run_record.time_to(curve[:3]) == {"0.88": 22.5, "0.94": None}


def test_allocator_times_both_settings_in_fresh_processes(tmp_path):
    from benchmarks import allocator

    assert allocator.main(["--steps", "2", "--rounds", "1", "--batch", "16", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("allocator-cpu-*.json")
    document = json.loads(path.read_text())
    assert [r["setting"] for r in document["runs"]] == list(allocator.SETTINGS)
    assert all(len(r["seconds"]) == 2 and min(r["seconds"]) > 0 for r in document["runs"])
    default, kept = document["rows"]
    assert kept["speedup"] == round(default["step_s"] / kept["step_s"], 2)
    assert default["step_s"] == round(document["runs"][0]["seconds"][1], 3)  # the first step is left out


def test_schedule_alternates_rounds():
    assert cpu.schedule(("a", "b", "c"), 3) == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]


@pytest.mark.parametrize("kind", [k for k in pipeline.PIPELINES if k != "assignment"])
def test_pipelines_make_the_assignments_batches(kind):
    """cnnlab's batches at 224 px match the assignment's for the same images.

    Both resize bilinearly with half-pixel centres. PIL's Resize also antialiases, which for an
    upscale (32 → 224) changes nothing, but it resizes the 8-bit image and rounds the result to 8 bits,
    where cnnlab interpolates in float. So they differ by that rounding alone: at most half an 8-bit
    step plus PIL's fixed-point error, and on average about a quarter of a step (uniform rounding
    error). In [-1, 1] units one step is 2/255 ≈ 0.0078: we allow one step for any value, half a step
    on average, and batch statistics equal to a tenth of a step.
    """
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    theirs = torch.stack([assignment.transform(224)(im) for im in assignment.to_pil(images)])
    ours = next(pipeline.batches(kind, images, torch.zeros(4, dtype=torch.long), 224, batch_size=4))[0]
    ours = ours[torch.argsort(_order(kind, images, ours))]  # TrainBatches shuffles: line the images up
    assert ours.shape == theirs.shape == (4, 3, 224, 224)
    step = 2 / 255
    diff = (ours - theirs).abs()
    assert diff.max() <= step and diff.mean() <= 0.5 * step
    assert abs(ours.mean() - theirs.mean()) < 0.1 * step and abs(ours.std() - theirs.std()) < 0.1 * step


def _order(kind, images, batch):
    # Which stored image each batch row is: the one whose own resize is nearest.
    single = to_input(images, 224, assignment.MEAN, assignment.STD)
    return torch.tensor([min(range(len(images)), key=lambda i: (row - single[i]).abs().mean()) for row in batch])


def test_normalising_first_equals_normalising_after_the_resize():
    # Bilinear weights sum to one, so cnnlab's order (normalise, then resize) changes nothing but rounding.
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    truth = F.interpolate(images.double() / 255, size=224, mode="bilinear", align_corners=False)
    truth = (truth - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    got = to_input(images, 224, mean, std, channels_last=True)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), truth, atol=2e-6, rtol=0)
    # The slower order, with torch's float32 interpolation kernel, is equal to its own rounding.
    torch.testing.assert_close(pipeline.resize_then_normalise(images, 224, mean, std).double(), truth,
                               atol=5e-5, rtol=0)


def test_degradation_dry_run(tmp_path, monkeypatch, one_thread):
    from benchmarks import degradation

    monkeypatch.delenv("CNNLAB_CIFAR10_JPEG", raising=False)
    assert degradation.main(["--quick", "--runs", str(tmp_path / "runs")]) == 0
    [path] = (tmp_path / "runs" / "quick").glob("degradation-cpu-*.json")
    document = json.loads(path.read_text())
    assert document["quick"] and document["dataset"] == "sample" and document["settings"]["width"] == 2
    assert [row["model"] for row in document["rows"]] == ["plain20", "plain56", "resnet20", "resnet56"]
    for row in document["rows"]:
        assert 0 <= row["train_error"] <= 100 and row["params"] > 0 and len(row["curve"]) == 1
    plain20, plain56 = document["rows"][:2]
    assert document["shape"]["plain56_trains_worse_than_plain20"] == (plain56["train_error"] > plain20["train_error"])
    assert Path(document["page"]).is_file() and "plain56" in Path(document["page"]).read_text()


def test_transfer_dry_run(tmp_path, one_thread):
    from benchmarks import transfer

    assert transfer.main(["--quick", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("transfer-cpu-*-quick.json")
    document = json.loads(path.read_text())
    assert document["quick"] and set(document["runs"]) == {"r18w16-s0", "plain20-s2"}
    assert document["before"]["setting"] == {"colour": "imagenet", "decay": 1.5, "transforms": "cnnlab", "steps": 2}
    assert len(document["history"]) == 6  # the defaults, then each other value of colour, decay and transforms
    [pair] = document["before"]["pairs"]
    assert pair["source"] == "r18w16-s0" and pair["check"] == "plain20-s2" and pair["n"] == 10
    assert pair["p_target"] == pytest.approx(sum(pair["per_class"]) / 10) and 0 <= pair["top1"] <= 10
    assert document["seed_spread"] == pytest.approx(abs(document["repeats"][0]["p_target"]
                                                         - document["before"]["p_target"]))
    assert document["after"]["setting"] == transfer.best_of(document["history"])
    assert [r["setting"] for r in document["repeats"]] == [{**document[k]["setting"], "seed": 1}
                                                            for k in ("before", "after")]
    assert not Path(document["runs"]["plain20-s2"]["path"]).is_absolute()


def test_transfer_keeps_each_lever_where_its_change_alone_was_best():
    from benchmarks.transfer import best_of

    base = {"colour": "imagenet", "decay": 1.5, "transforms": "cnnlab", "steps": 256}

    def row(p, **change):
        return {"setting": {**base, **change}, "p_target": p}

    history = [row(0.5), row(0.6, colour="data"), row(0.4, decay=1.0), row(0.7, decay=2.0),
               row(0.5, transforms="off"), row(0.3, transforms="lucid"), row(0.55, steps=512), row(0.5, steps=128)]
    assert best_of(history) == {"colour": "data", "decay": 2.0, "transforms": "cnnlab", "steps": 512}
