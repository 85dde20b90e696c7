"""``cnnlab serve``: the explorer, started as a real server on 127.0.0.1 and driven over HTTP and in a browser.

The browser is Debian's ``chromium`` driven by Playwright, as in ``test_report.py`` (nothing is
downloaded). Screenshots go to ``tests/artifacts/`` (or ``$CNNLAB_TEST_ARTIFACTS``). The load test
runs 20 clients for ``$CNNLAB_SERVE_LOAD_S`` seconds (default 30, as the feature asks).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from pagewatch import watch
from PIL import Image

from cnnlab import cli
from cnnlab.predict import predict, ranked
from cnnlab.run import load
from cnnlab.serve import load_runs
from cnnlab.serve.app import CSP, MAX_UPLOAD
from cnnlab.serve.store import Image as Uploaded
from cnnlab.viz.filters import conv_filters
from cnnlab.viz.top_images import top_images

ARTIFACTS = Path(os.environ.get("CNNLAB_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
LOAD_SECONDS = float(os.environ.get("CNNLAB_SERVE_LOAD_S", "30"))
HOSTILE = "<img src=x onerror=alert(1)>.png"
CLASSES = ["<img src=x onerror=alert(2)>", "a&b \"quoted\" 'single'"]  # class names that are markup


class Server:
    """``cnnlab serve`` in a subprocess on a free port of 127.0.0.1, with the URL it printed."""

    def __init__(self, runs: list[Path], log: Path):
        self.log = log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", *map(str, runs), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=self._log_file, text=True, bufsize=1)
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()
                break
        found = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        if not found:
            self.stop()
            raise AssertionError(f"cnnlab serve printed {line!r}; its log: {log.read_text()[-2000:]}")
        self.url = found[1]
        self.port = urlsplit(self.url).port

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One raw request: the path is sent exactly as given (no client-side normalisation)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def json(self, path: str) -> dict:
        status, _, body = self.request("GET", path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def rss(self) -> int:
        """Resident memory of the server process, bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> Path:
    """A 1-epoch width-2 run on a two-class folder dataset whose class names are markup."""
    from cnnlab.config import resolve
    from cnnlab.train.engine import train

    root = tmp_path_factory.mktemp("hostile") / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for k, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                pixels[..., k] = 255
                Image.fromarray(pixels).save(folder / f"{i}.png")
    cfg = resolve(overrides=dict(recipe="fast", dataset=f"folder:{root}", model="resnet18-cifar", width=2,
                                 image_size=16, epochs=1, batch_size=8, lr=0.05, device="cpu",
                                 out=str(root.parent / "<i>run&amp;")))
    return train(cfg).run_dir


@pytest.fixture(scope="module")
def server(runs, hostile_run, tmp_path_factory):
    s = Server([*runs, hostile_run], tmp_path_factory.mktemp("serve-log") / "serve.log")
    yield s
    s.stop()


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if "explore" not in p.parts}


def _png(path: Path, runs: list[Path], index: int = 7, side: int = 96) -> Path:
    """Test image ``index`` of the run, enlarged to ``side`` px, as a PNG file (something to upload)."""
    images, _ = load(runs[0]).test_set()
    Image.fromarray(images[index].permute(1, 2, 0).numpy()).resize((side, side), Image.BILINEAR).save(path)
    return path


# --- the command line ------------------------------------------------------------------------------


def test_serve_mistakes_are_one_line(runs, tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert cli.main(["serve", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no metrics.jsonl" in err and err.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert cli.main(["serve", str(runs[0]), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err and err.count("\n") == 1


# --- safety ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/static/../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/static/..%2f..%2fetc%2fpasswd",
    "/static/%2e%2e%2f%2e%2e%2fconfig.json", "/run/0/../../config.json", "/../config.json", "//etc/passwd",
    "/etc/passwd", "/config.json", "/checkpoints/best.pt", "/metrics.jsonl", "/explore/scores.json",
    "/run/3", "/api/3/predict?image=t0-1", "/api/9/curves", "/api/0/predict?image=t3-1",
    "/api/0/predict?image=../../config.json", "/api/0/predict?image=%2Fetc%2Fpasswd", "/static/app.py",
    "/static/%2Fetc%2Fpasswd",
])
def test_paths_outside_the_app_get_404(server, runs, path):
    status, headers, body = server.request("GET", path)
    assert status == 404, (path, status, body[:200])
    assert b"root:" not in body and b"checkpoint" not in body
    assert headers["content-security-policy"] == CSP and headers["x-content-type-options"] == "nosniff"


def test_the_server_answers_only_its_own_names_and_page(server, runs, tmp_path):
    status, _, body = server.request("GET", "/api/0/predict?image=t0-7", headers={"Host": "evil.example"})
    assert status == 400 and b"label" not in body
    assert json.loads(body)["error"].startswith(f"this server answers to 127.0.0.1:{server.port}, "
                                                f"localhost:{server.port}, [::1]:{server.port}, not to the host")
    assert server.request("GET", "/api/0/curves", headers={"Host": f"127.0.0.1:{server.port + 1}"})[0] == 400
    assert server.request("GET", "/api/0/curves", headers={"Host": f"localhost:{server.port}"})[0] == 200
    png = _png(tmp_path / "seven.png", runs).read_bytes()
    status, _, body = server.request("POST", "/api/0/upload", png, {"Origin": "http://evil.example",
                                                                    "Content-Type": "text/plain"})
    assert status == 403 and json.loads(body)["error"].startswith("refused: a POST must come from this app's own")
    assert server.request("POST", "/api/0/upload", png, {"Origin": server.url.rstrip("/")})[0] == 200


def test_uploads_are_checked_and_never_written(server, runs, tmp_path):
    before = [_files(r) for r in runs]
    cwd_before = set(os.listdir("."))

    status, _, body = server.request("POST", "/api/0/upload?name=notes.txt", b"just some text, not a picture\n")
    assert status == 415
    assert "notes.txt is not an image cnnlab can read: not an image PIL can read" in json.loads(body)["error"]

    status, _, body = server.request("POST", "/api/0/upload?name=big.png", b"\x89PNG" + b"\0" * MAX_UPLOAD)
    assert status == 413 and "larger than 20 MB" in json.loads(body)["error"]

    # A Content-Length that understates the body changes nothing: the bytes are counted as they arrive.
    status, _, _ = server.request("POST", "/api/0/upload", b"", {"Content-Length": "0"})
    assert status == 400

    png = _png(tmp_path / "seven.png", runs)
    status, _, body = server.request("POST", "/api/0/upload?name=" + "seven.png", png.read_bytes())
    assert status == 200
    ref = json.loads(body)["image"]
    got = server.json(f"/api/0/predict?image={ref}")
    want = predict(runs[0], [png], top_k=5, device="cpu")[0]["top"]
    assert [t["label"] for t in got["top"]] == [t["label"] for t in want]
    assert [t["prob"] for t in got["top"]] == pytest.approx([t["prob"] for t in want], abs=1e-6)

    assert [_files(r) for r in runs] == before  # nothing but the explorer's own cache in the run folders
    assert set(os.listdir(".")) == cwd_before


def test_heavy_results_are_computed_once_and_cached_on_disk(runs):
    served = load_runs([runs[1]])[0]
    layer, channel = served.default_layer, 2

    seen = []

    def finished(ask):
        deadline = time.monotonic() + 120
        while True:
            status = ask()
            seen.append((status.state, status.progress))
            if status.state in ("done", "failed") or time.monotonic() > deadline:
                return status
            time.sleep(0.02)

    status = finished(lambda: served.top_images(layer, channel))
    assert status.state == "done", status.error
    # Asked first, it is queued: the answer is its state, at once, not the result.
    assert seen[0] == ("queued", 0.0) and all(0.0 <= p <= 1.0 for _, p in seen)
    key = f"0:top-images:layer={layer}:channel={channel}"
    assert served.jobs.computed == {key: 1}
    cached = runs[1] / "explore" / "top-images" / f"{layer}-{channel}.json"
    saved = json.loads(cached.read_text())
    assert saved["result"] == status.result

    images, _ = served.test_set()
    direct = top_images(load(runs[1]).model, images, served.loaded.preprocess, layer=layer, channel=channel, count=9)
    assert status.result["indices"] == direct.indices.tolist()
    assert status.result["scores"] == pytest.approx(direct.scores.tolist(), rel=1e-5)
    assert status.result["boxes"] == [list(b) for b in direct.boxes]

    again = served.top_images(layer, channel)  # asked again: the same answer, not computed again
    assert again.state == "done" and again.result == status.result
    assert served.jobs.computed == {key: 1}

    # A new server on the same run reads the file instead of computing.
    restarted = load_runs([runs[1]])[0]
    from_disk = restarted.top_images(layer, channel)
    assert from_disk.state == "done" and from_disk.result == status.result
    assert sum(restarted.jobs.computed.values()) == 0

    # A retrained run (another checkpoint) does not take the old result.
    os.utime(served.loaded.path, ns=(time.time_ns(), time.time_ns()))
    assert load_runs([runs[1]])[0].top_images(layer, channel).state in ("queued", "running")


def test_a_run_without_its_dataset_still_serves_uploads(hostile_run, caplog):
    data = hostile_run.parent / "data"
    moved = data.rename(data.with_name("moved"))
    try:
        with caplog.at_level("WARNING", logger="cnnlab.serve"):
            served = load_runs([hostile_run])[0]
    finally:
        moved.rename(data)
    assert "the run's test set cannot be read" in caplog.text
    status = served.scores()
    deadline = time.monotonic() + 30
    while status.state in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
        status = served.scores()
    assert status.state == "failed" and status.error.startswith("the run's test set cannot be read")
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (250, 10, 10)).save(buffer, format="PNG")
    got = served.predict(Uploaded("red.png", {served.index: served.decode(buffer.getvalue())}), None)
    assert sorted(t["label"] for t in got["top"]) == sorted(CLASSES)
    assert sum(t["prob"] for t in got["top"]) == pytest.approx(1.0, abs=1e-5)


# --- the page, in a browser ---------------------------------------------------------------------------


def test_explorer_in_a_browser(server, runs, browser, tmp_path, capsys):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    seen = watch(page)
    errors, hosts, dialogs = seen.errors, seen.hosts, seen.dialogs
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    served = load_runs([runs[0]])[0]
    last = served.default_layer  # the last spatial feature block: what a CAM uses by default
    try:
        page.goto(server.url, wait_until="load")
        assert page.url == server.url + "run/0"

        # Image in: an upload's top-5 is what `cnnlab predict` prints for the same file.
        png = _png(tmp_path / "upload.png", runs)
        page.set_input_files("#file", str(png))
        rows = page.locator("#top5 tbody tr")
        rows.nth(4).wait_for()
        shown = [(rows.nth(k).locator("td").nth(0).inner_text(), rows.nth(k).locator("td").nth(1).inner_text())
                 for k in range(rows.count())]
        assert cli.main(["predict", str(runs[0]), str(png), "--device", "cpu"]) == 0
        printed = capsys.readouterr().out.strip().split("  ")[1:]
        assert [f"{label} {percent}" for label, percent in shown] == printed
        caption = page.inner_text("#input-caption")
        assert "upload.png" in caption and "32×32" in caption and "TTA on" in caption

        # Why: another target, another picture.
        page.wait_for_function("() => document.getElementById('explanation').dataset.target !== undefined")
        first = page.get_attribute("#explanation", "src")
        assert page.get_attribute("#explanation", "data-target") == str(load(runs[0]).classes.index(shown[0][0]))
        rows.nth(1).click()
        page.wait_for_function("src => document.getElementById('explanation').getAttribute('src') !== src", arg=first)
        assert page.inner_text("#explanation-caption") == f"grad-cam for class {shown[1][0]} at {last}"
        page.select_option("#method", "integrated-gradients")
        page.wait_for_function("() => document.getElementById('explanation-caption').textContent"
                               ".startsWith('integrated-gradients')")
        assert page.locator("#layer").is_disabled()
        page.select_option("#method", "grad-cam")
        # The trust scores, beside each method (computed in the background).
        page.locator("#trust tbody tr").nth(9).wait_for(timeout=240_000)
        assert page.locator("#trust tbody tr th").all_inner_texts()[:4] == ["grad-cam", "grad-cam++", "score-cam",
                                                                          "layer-cam"]

        # Inside: a layer's feature maps, then a channel's top images, maximisation and filters.
        page.click(f'#arch tr[data-layer="{last}"]')
        maps = page.locator("#maps img")
        maps.nth(0).wait_for()
        size = {s["name"]: s["output_size"] for s in served.summary["stages"]}[last]
        assert maps.count() == size[0]
        assert page.inner_text("#maps-title").startswith(f"Feature maps of {last}: " + "×".join(map(str, size)))
        maps.nth(3).click()
        tops = page.locator("#top-images figure")
        tops.nth(8).wait_for(timeout=120_000)
        page.locator("#maximized").wait_for(state="visible", timeout=120_000)
        run = load(runs[0])
        images, _ = run.test_set()
        direct = top_images(run.model, images, run.preprocess, layer=last, channel=3, count=9)
        captions = page.locator("#top-images figcaption").all_inner_texts()
        assert [int(re.match(r"#(\d+)", c)[1]) for c in captions] == direct.indices.tolist()
        assert page.locator("#top-images .rf").count() == 9
        conv, weight = conv_filters(run.model, last)
        assert page.locator("#filters img").count() == min(64, weight.shape[1])
        assert page.inner_text("#filters-caption").startswith(f"{conv}: " + "×".join(map(str, weight.shape[1:])))
        page.screenshot(path=str(ARTIFACTS / "serve-inside.png"), full_page=True)

        # Run: the confusion matrix's cells open their images.
        cells = page.locator("#confusion td")
        cells.nth(99).wait_for(timeout=60_000)
        matrix = [[int(cells.nth(10 * t + p).inner_text()) for p in range(10)] for t in range(10)]
        assert sum(map(sum, matrix)) == len(images)
        t, p = max(((t, p) for t in range(10) for p in range(10) if t != p), key=lambda tp: matrix[tp[0]][tp[1]])
        cells.nth(10 * t + p).click()
        page.wait_for_function(f"() => document.querySelectorAll('#cell-images figure').length === "
                               f"{min(matrix[t][p], 60)}")
        assert page.locator("#curves img").count() == 2

        # Browse the test set: the most confident mistakes, then one of them as the image.
        page.select_option("#browse", "confident-wrong")
        page.locator("#thumbs figure").nth(0).wait_for()
        wrong = sum(matrix[t][p] for t in range(10) for p in range(10) if t != p)
        assert page.locator("#thumbs figure").count() == min(wrong, 60)
        captions = page.locator("#thumbs figcaption").all_inner_texts()
        confidences = [int(re.search(r"\((\d+)%\)", c)[1]) for c in captions]
        assert confidences == sorted(confidences, reverse=True)
        page.locator("#thumbs figure").nth(0).click()
        page.wait_for_function("() => document.getElementById('input-caption').textContent.startsWith('test image')")

        # Two runs side by side: the same image through the second run (a copy: the same answer).
        page.select_option("#compare", "1")
        page.locator("#other-top5 tbody tr").nth(4).wait_for()
        assert page.locator("#other-top5 tbody").inner_text() == page.locator("#top5 tbody").inner_text()
        page.locator("#other-explanation").wait_for(state="visible")
        page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)

        # Class and run names that are markup are shown as text, in the page and in what the script writes.
        page.goto(server.url + "run/2", wait_until="load")
        assert page.locator("h1 .run-name").inner_text() == "<i>run&amp;"
        assert page.locator("#target option").all_inner_texts()[1:] == CLASSES
        cells = page.locator("#confusion td")
        cells.nth(3).wait_for(timeout=60_000)
        assert page.locator("#confusion th").all_inner_texts()[1:3] == CLASSES
        page.locator("#browse").select_option("class:0")
        page.locator("#thumbs figure").nth(5).wait_for()
        assert all(CLASSES[0] + " → " in c for c in page.locator("#thumbs figcaption").all_inner_texts())
        assert page.locator('img[src="x"]').count() == 0 and page.locator("i").count() == 0 and dialogs == []

        # A hostile file name is shown as text.
        page.set_input_files("#file", files=[{"name": HOSTILE, "mimeType": "image/png", "buffer": png.read_bytes()}])
        page.wait_for_function("name => document.getElementById('input-caption').textContent.startsWith(name)",
                               arg=HOSTILE)
        assert page.locator('img[src="x"]').count() == 0 and dialogs == []

        assert errors == []
        assert hosts <= {"127.0.0.1", "data"}, hosts

        # A file that is not an image: a clear message on the page (the browser logs the 415 itself).
        page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}])
        page.wait_for_function("() => document.getElementById('message').textContent.includes('not an image')")
        assert page.inner_text("#message").startswith("notes.txt is not an image cnnlab can read")
        assert [e for e in errors if "415" not in e] == []
    finally:
        page.close()


# --- load ------------------------------------------------------------------------------------------------


def test_twenty_clients_get_correct_answers_and_memory_stays_bounded(server, runs):
    run = load(runs[0])
    images, _ = run.test_set()
    served = load_runs([runs[0]])[0]
    picks = [0, 13, 42, 77, 150]
    expected_top = {}
    expected_cam = {}
    for i in picks:
        (top,) = ranked(run.model, run.classes, run.preprocess.to_input(images[i][None]), 5, run.tta)
        expected_top[i] = top
        image = served.pixels(f"t0-{i}", [served])
        expected_cam[i] = served.explain(image, "grad-cam", top[1]["index"], None)["picture"]

    def decoded(uri: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))), dtype=int)

    # A long job in the background the whole time: it must not hold up the requests.
    server.json(f"/api/0/channel?layer={served.default_layer}&channel=7")
    errors: list[str] = []
    counts = {"predict": 0, "cam": 0}
    slowest = [0.0]
    lock = threading.Lock()
    stop = time.monotonic() + LOAD_SECONDS

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        k = n
        while time.monotonic() < stop:
            i = picks[k % len(picks)]
            kind = "cam" if k % 2 else "predict"
            k += 1
            target = expected_top[i][1]["index"]
            path = (f"/api/0/explain?image=t0-{i}&method=grad-cam&target={target}" if kind == "cam"
                    else f"/api/0/predict?image=t0-{i}")
            start = time.monotonic()
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                body = r.read()
            except OSError as e:
                with lock:
                    errors.append(f"{path}: {e!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                continue
            took = time.monotonic() - start
            problem = None
            if r.status != 200:
                problem = f"{path}: {r.status} {body[:200]!r}"
            elif kind == "predict":
                got = json.loads(body)["top"]
                want = expected_top[i]
                if [t["index"] for t in got] != [t["index"] for t in want] or max(
                        abs(a["prob"] - b["prob"]) for a, b in zip(got, want)) > 1e-5:
                    problem = f"{path}: top-5 {got} differs from {want}"
            else:
                got = json.loads(body)
                if got["target"] != target or np.abs(decoded(got["picture"]) - decoded(expected_cam[i])).max() > 2:
                    problem = f"{path}: a different picture"
            with lock:
                counts[kind] += 1
                slowest[0] = max(slowest[0], took)
                if problem:
                    errors.append(problem)
        conn.close()

    # Memory after a warm-up (every code path and thread pool in use), against memory at the end.
    warm = threading.Thread(target=client, args=(0,))
    warm_stop = stop
    stop = time.monotonic() + min(5.0, LOAD_SECONDS / 4)
    warm.start()
    warm.join()
    rss_warm = server.rss()
    stop = warm_stop
    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    # Meanwhile the page itself still answers at once.
    page_times = []
    while time.monotonic() < stop:
        start = time.monotonic()
        status, _, _ = server.request("GET", "/static/app.css")
        assert status == 200
        page_times.append(time.monotonic() - start)
        time.sleep(0.5)
    for t in threads:
        t.join()
    rss_end = server.rss()

    assert errors[:5] == []
    assert counts["predict"] >= 20 and counts["cam"] >= 20, counts
    assert max(page_times) < 1.0, max(page_times)
    assert rss_end - rss_warm < 150 * 2**20, (rss_warm, rss_end)
    print(f"{counts} in {LOAD_SECONDS:.0f} s by 20 clients; slowest {slowest[0]:.2f} s; "
          f"static file at most {max(page_times):.3f} s; RSS {rss_warm / 2**20:.0f} → {rss_end / 2**20:.0f} MB")
