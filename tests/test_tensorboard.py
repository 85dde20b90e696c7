"""TensorBoard as users use it: a real server on 127.0.0.1 serves the run's curves, images, text and hparams."""

import html
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

STARTUP_SECONDS = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base, path, params=None, body=None):
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(small_run, tmp_path_factory):
    """``tensorboard --logdir RUN_DIR/tb`` on a free local port; stopped however the tests end."""
    port = free_port()
    log = (tmp_path_factory.mktemp("tb") / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(small_run / "tb"),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"tensorboard exited with status {proc.returncode}:\n{log.read()[-2000:]}")
            try:
                if "train/loss" in get(base, "/data/plugin/scalars/tags").get(".", {}):
                    break  # up, and the run's events are loaded
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tensorboard did not serve the run within {STARTUP_SECONDS} s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_scalars_api_serves_the_train_loss_of_metrics_jsonl(server, small_run):
    points = get(server, "/data/plugin/scalars/scalars", {"run": ".", "tag": "train/loss"})
    steps = [r for r in metrics(small_run) if r["kind"] == "step"]
    assert len(steps) == 8  # 900 training images in batches of 128
    assert [step for _, step, _ in points] == [r["step"] for r in steps]
    assert [value for _, _, value in points] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    epoch, = [r for r in metrics(small_run) if r["kind"] == "epoch"]
    test_acc = get(server, "/data/plugin/scalars/scalars", {"run": ".", "tag": "test/acc"})
    assert [(s, v) for _, s, v in test_acc] == [(epoch["step"], pytest.approx(epoch["test_acc"], rel=1e-6))]


def test_hparams_tab_shows_the_configuration_with_final_metrics(server, small_run):
    request = {"experimentName": "", "startIndex": 0, "sliceSize": 10, "colParams": [],
               "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]}
    groups = get(server, "/data/plugin/hparams/session_groups", body=request)["sessionGroups"]
    assert len(groups) == 1
    hparams = groups[0]["hparams"]
    assert hparams["model"] == "resnet18-cifar" and hparams["width"] == 8 and hparams["lr"] == pytest.approx(0.2)
    values = {m["name"]["tag"]: m["value"] for m in groups[0]["metricValues"]}
    epoch, = [r for r in metrics(small_run) if r["kind"] == "epoch"]
    for tag, key in (("test/acc", "test_acc"), ("val/acc", "val_acc"), ("epoch/train_acc", "train_acc")):
        assert values[tag] == pytest.approx(epoch[key], rel=1e-6), tag


def test_filters_predictions_and_config_are_served(server, small_run):
    images = get(server, "/data/plugin/images/tags")["."]
    assert {"conv1/filters", "predictions"} <= set(images)
    for tag in ("conv1/filters", "predictions"):
        entries = get(server, "/data/plugin/images/images", {"run": ".", "tag": tag})
        assert [e["step"] for e in entries] == [8], tag  # once per epoch
        png = urllib.request.urlopen(server + "/data/plugin/images/individualImage?" + entries[0]["query"],
                                     timeout=10).read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((small_run / "config.json").read_text())["config"]
    text = get(server, "/data/plugin/text/text", {"run": ".", "tag": "config/text_summary"})
    assert f'"width": {config["width"]}' in html.unescape(text[0]["text"])
