"""benchmarks/data.py at a tiny size: its rows run and its table and summary hold together."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the benchmarks package lives at the root

from benchmarks import data  # noqa: E402


def test_data_benchmark_rows_and_table(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    s = data.Settings(images=24, side=40, store_size=32, decoder_images=3)
    folder = data.make_folder(tmp_path / "folder", s)
    assert folder["images"] == 24 and len(list((tmp_path / "folder").rglob("*.jpg"))) == 24
    job = {"root": str(tmp_path / "folder"), "store_size": 32}
    document = {
        "machine": {"date": "2026-11-29", "cpu": "x", "cores": 2, "torch": "t", "load_average": [0, 0, 0]},
        "settings": {"store_size": 32}, "folder": folder, "decoders": data.decoders(s),
        "imagefolder": data.row_imagefolder(job), "build": data.row_build(job),
        "capped_train": {"error": "not run here", "cap_mb": 64.0},
        "speed": [{"on_device": True, "images_per_s": 100.0}, {"on_device": False, "images_per_s": 90.0}],
    }
    assert document["build"]["images"] == 24 and document["build"]["stored"] == [3, 32, 32]
    assert document["imagefolder"]["images"] == 22  # every 20th image is a test image: 0 and 20
    assert all(r["images_per_s"] > 0 for r in document["decoders"])
    summary = data.summarise(document)["summary"]
    assert summary["cache_over_memory_images_per_s"] == 0.9 and summary["build_over_imagefolder"] > 0
    assert "cache / memory images/s: 0.9" in data.tables(document)
