"""benchmarks/data.py at a tiny size: its rows run and its table and summary hold together."""


from benchmarks import data


def test_data_benchmark_rows_and_table(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    s = data.Settings(images=24, side=40, store_size=32, decoder_images=3)
    folder = data.make_folder(tmp_path / "folder", s)
    assert folder["images"] == 24 and len(list((tmp_path / "folder").rglob("*.jpg"))) == 24
    job = {"root": str(tmp_path / "folder"), "store_size": 32}
    document = {
        "machine": {"date": "2026-11-29", "cpu": "x", "cores": 2, "torch": "t", "load_average": [0, 0, 0]},
        "settings": {"store_size": 32}, "folder": folder, "decoders": data.decoders(s),
        "imagefolder": [data.row_imagefolder(job)], "build": [data.row_build(job)],
        "capped_build": {"error": "not run here"}, "capped_train": {"error": "not run here", "cap_mb": 64.0},
        "speed": data.row_speed({"epochs": 2, "limit_train": 700, "width": 2}),
    }
    assert document["build"][0]["images"] == 24 and document["build"][0]["stored"] == [3, 32, 32]
    assert document["imagefolder"][0]["images"] == 22  # every 20th image is a test image: 0 and 20
    assert document["speed"]["memory_images_per_s"] > 0 and document["speed"]["cache_images_per_s"] > 0
    assert all(r["images_per_s"] > 0 for r in document["decoders"])
    summary = data.summarise(document)["summary"]
    assert summary["cache_over_memory_images_per_s"] == document["speed"]["ratio"] > 0
    assert summary["build_over_imagefolder"] > 0 and "cache / memory images/s:" in data.tables(document)
