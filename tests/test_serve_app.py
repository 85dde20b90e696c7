"""The explorer's endpoints one by one, through Starlette's ``TestClient`` (no server process, no browser),
its Host and Origin checks, the bounded job queue, and the answers to malformed numbers.

Every answer is checked against what cnnlab computes directly for the same input: ``cnnlab.predict``
for a top-5, ``top_images`` for a channel, ``score`` for the confusion matrix.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from cnnlab import cli
from cnnlab.core.errors import UserError, one_line
from cnnlab.core.metrics import confusion_matrix, score
from cnnlab.predict import predict
from cnnlab.report.page import document_head
from cnnlab.run import load
from cnnlab.serve import load_runs, serve
from cnnlab.serve.app import CSP, FORGOTTEN, MAX_UPLOAD, create_app, whole_number
from cnnlab.serve.jobs import Busy, Jobs, Task
from cnnlab.serve.middleware import LOOPBACK, allowed_hosts
from cnnlab.serve.runs import Served
from cnnlab.viz.top_images import top_images

BASE = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def served(runs, one_thread) -> list[Served]:
    # A short idle time: a task the tests stop asking about is dropped within seconds.
    return load_runs(runs, jobs=Jobs(idle=3.0))


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served), base_url=BASE) as c:
        yield c


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """A 40×30 colour gradient as a PNG file (something to upload)."""
    y, x = np.mgrid[0:30, 0:40]
    rgb = np.stack([x * 6, y * 8, (x + y) * 3], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("upload") / "gradient.png"
    Image.fromarray(rgb).save(path)
    return path


def _done(client: TestClient, path: str, status_of=lambda d: d, timeout: float = 120) -> dict:
    """Asks ``path`` until the task its answer reports is done (as the page polls); the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
        data = r.json()
        state = status_of(data)["state"]
        assert state != "failed", data
        if state == "done":
            return data
        assert time.monotonic() < deadline, f"{path} still {state}"
        time.sleep(0.05)


def _upload(client: TestClient, path: Path, run: int = 0) -> str:
    r = client.post(f"/api/{run}/upload?name={path.name}", content=path.read_bytes())
    assert r.status_code == 200, r.text
    assert r.json()["name"] == path.name and r.json()["image"].startswith("u-")
    return r.json()["image"]


# --- the page and its files ----------------------------------------------------------------------------------


def test_home_redirects_to_the_first_run(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/run/0"


def test_page_per_run_and_404_for_runs_not_given(client, served):
    r = client.get("/run/1")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    head = document_head("cnnlab serve: run-b", '<link rel="stylesheet" href="/static/app.css">\n'
                                                '<script src="/static/app.js" defer></script>\n'
                                                '<script src="/static/labels.js" defer></script>')
    assert r.text.startswith(head + '<body data-run="1" ')
    assert r.headers["content-security-policy"] == CSP and r.headers["x-content-type-options"] == "nosniff"
    for path in ("/run/2", "/run/x", "/run/-1", "/run/" + "1" * 5000):
        r = client.get(path)
        assert r.status_code == 404 and r.json() == {"error": "not found"}, path
        assert r.headers["content-security-policy"] == CSP


def test_static_files(client):
    import cnnlab.serve

    folder = Path(cnnlab.serve.__file__).parent / "static"
    for name, kind in (("app.js", "text/javascript"), ("labels.js", "text/javascript"), ("app.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == f"{kind}; charset=utf-8"
        assert r.content == (folder / name).read_bytes()
    assert client.get("/static/app.py").status_code == 404


# --- uploads and predictions -------------------------------------------------------------------------------------


def test_an_upload_is_predicted_as_cnnlab_predict_does(client, served, runs, picture):
    ref = _upload(client, picture)
    answers = {}
    for tta in (None, False):
        query = "" if tta is None else "&tta=0"
        got = client.get(f"/api/0/predict?image={ref}{query}").json()
        want = predict(runs[0], [picture], top_k=5, device="cpu", tta=tta)[0]["top"]
        assert got["tta"] == (served[0].loaded.tta if tta is None else tta)
        assert [t["label"] for t in got["top"]] == [t["label"] for t in want]
        assert [t["prob"] for t in got["top"]] == pytest.approx([t["prob"] for t in want], abs=1e-6)
        assert [t["percent"] for t in got["top"]] == [f"{100 * t['prob']:.1f}%" for t in got["top"]]
        assert got["image"] == "gradient.png" and got["label"] is None and got["size"] == "32×32"
        assert got["input"].startswith("data:image/png;base64,")
        answers[tta] = got
    # The upload was decoded for every run: the second one (a copy of the first) reads it by the same reference.
    second = client.get(f"/api/1/predict?image={ref}").json()
    assert second["top"] == answers[None]["top"]


def test_upload_mistakes(client, served):
    kept = len(served[0].images)
    r = client.post("/api/0/upload?name=notes.txt", content=b"just some text\n")
    assert r.status_code == 415
    assert r.json()["error"].startswith("notes.txt is not an image cnnlab can read: not an image PIL can read")
    r = client.post("/api/0/upload", content=b"")
    assert r.status_code == 400 and r.json()["error"] == "the upload is empty; give an image file"
    r = client.post("/api/0/upload", content=b"\x89PNG" + b"\0" * MAX_UPLOAD)
    assert r.status_code == 413 and r.json()["error"].startswith("the file is larger than 20 MB")
    assert client.post("/api/7/upload", content=b"x").status_code == 404
    assert client.get("/api/0/upload").status_code == 405
    assert len(served[0].images) == kept


def test_a_test_image_is_predicted_with_its_label(client, served):
    images, labels = served[0].test_set()
    got = client.get("/api/0/predict?image=t0-7").json()
    assert got["image"] == "test image 7" and got["label"] == served[0].classes[int(labels[7])]
    # The same test image through the other run: its own prediction, no label (not its test set).
    other = client.get("/api/1/predict?image=t0-7").json()
    assert other["label"] is None and [t["label"] for t in other["top"]] == [t["label"] for t in got["top"]]
    for ref in ("u-0123456789abcdef", "t0-100000", "t5-1", "t0-\u0663", "../config.json"):
        r = client.get(f"/api/0/predict?image={ref}")
        assert r.status_code == 404 and r.json() == {"error": FORGOTTEN}, ref
    assert client.get("/api/9/predict?image=t0-1").status_code == 404


# --- explanations, feature maps, channels -------------------------------------------------------------------------


def test_explain(client, served):
    s = served[0]
    first = client.get("/api/0/predict?image=t0-3").json()["top"][0]["index"]
    got = client.get("/api/0/explain?image=t0-3").json()
    assert (got["method"], got["target"], got["layer"]) == ("grad-cam", first, s.default_layer)
    got = client.get(f"/api/0/explain?image=t0-3&target=4&layer={s.layers[0]}").json()
    assert (got["target"], got["label"], got["layer"]) == (4, s.classes[4], s.layers[0])
    assert got["picture"].startswith("data:image/png;base64,")
    got = client.get("/api/0/explain?image=t0-3&method=saliency&target=2").json()
    assert (got["method"], got["target"], got["layer"]) == ("saliency", 2, None)

    for query, message in (("method=nope", "unknown method 'nope'; choose one of: grad-cam, "),
                           ("target=10", "class 10 is out of range (0 … 9)"),
                           ("target=\u00b2", "target must be a whole number (got '\u00b2')"),
                           ("target=-1", "target must be a whole number (got '-1')"),
                           ("target=1e3", "target must be a whole number (got '1e3')"),
                           ("layer=nowhere", "nowhere")):
        r = client.get(f"/api/0/explain?image=t0-3&{query}")
        assert r.status_code == 400 and message in r.json()["error"], (query, r.text)


def test_features(client, served):
    s = served[0]
    size = {st["name"]: st["output_size"] for st in s.summary["stages"]}[s.default_layer]
    got = client.get("/api/0/features?image=t0-5").json()
    assert got["layer"] == s.default_layer and got["shape"] == size
    assert got["shown"] == len(got["tiles"]) == size[0]
    assert got["range"][0] <= got["range"][1]
    r = client.get("/api/0/features?image=t0-5&layer=nowhere")
    assert r.status_code == 400


def test_channel_top_images_and_filters(client, served):
    s = served[0]
    layer = s.default_layer
    got = _done(client, f"/api/0/channel?layer={layer}&channel=2", lambda d: d["top"])
    assert (got["layer"], got["channel"]) == (layer, 2)
    images, _ = s.test_set()
    direct = top_images(load(s.run_dir).model, images, s.loaded.preprocess, layer=layer, channel=2, count=9)
    assert got["top"]["result"]["indices"] == direct.indices.tolist()
    assert [t["ref"] for t in got["top"]["result"]["thumbs"]] == [f"t0-{i}" for i in direct.indices.tolist()]
    assert len(got["filters"]["tiles"]) == min(64, got["filters"]["inputs"])
    assert got["maximize"]["state"] in ("queued", "running", "done")

    count = {st["name"]: st["output_size"] for st in s.summary["stages"]}[layer][0]
    for query, message in ((f"channel={count}", f"{layer} has {count} channels (0 … {count - 1}); "
                                                f"channel {count} is out of range"),
                           ("channel=\u00b2", "channel must be a whole number (got '\u00b2')"),
                           ("channel=9999999999", "channel must be a whole number")):
        r = client.get(f"/api/0/channel?layer={layer}&{query}")
        assert r.status_code == 400 and message in r.json()["error"], (query, r.text)


def test_trust_reads_the_runs_sanity_checks(client, served):
    saved = {"settings": {"judged_at": "layer4"},
             "methods": {"grad-cam": {"verdict": "trustworthy", "checks": {"randomisation": True},
                                      "randomisation_rho": {"layer4": 0.125}, "insertion_auc": 0.5,
                                      "road": 0.25, "deletion_auc": 0.0625}}}
    folder = served[1].run_dir / "viz" / "sanity"
    folder.mkdir(parents=True)
    (folder / "sanity.json").write_text(json.dumps(saved))
    got = _done(client, "/api/1/trust")["result"]
    assert got == {"source": "cnnlab visualize sanity",
                   "methods": {"grad-cam": {"verdict": "trustworthy", "checks": {"randomisation": True},
                                            "randomisation_rho": 0.125, "insertion_auc": 0.5, "road": 0.25,
                                            "deletion_auc": 0.0625}}}


# --- the run ------------------------------------------------------------------------------------------------------


def test_curves(client):
    got = client.get("/api/0/curves").json()["curves"]
    assert [c["alt"] for c in got] == ["training loss, accuracy and learning rate at every step",
                                       "train, validation and test loss and accuracy after every epoch"]
    assert all(c["src"].startswith("data:image/png;base64,") for c in got)


def test_confusion_and_lists_of_test_images(client, served):
    s = served[0]
    got = _done(client, "/api/0/confusion", lambda d: d["status"])
    images, labels = s.test_set()
    direct = score(load(s.run_dir).model, images, labels, s.loaded.preprocess, tta=s.loaded.tta)
    want = confusion_matrix(direct.predictions, direct.labels, len(s.classes))
    assert got["classes"] == s.classes
    assert got["confusion"]["matrix"] == want.tolist() and got["confusion"]["n"] == len(labels)
    assert got["confusion"]["top1"] == pytest.approx(direct.top1, abs=1e-9)

    m = torch.tensor(got["confusion"]["matrix"])
    wrong = int(m.sum() - m.trace())
    listed = client.get("/api/0/images?filter=wrong").json()
    assert listed["count"] == wrong and len(listed["images"]) == min(wrong, 60)
    assert all(im["true"] != im["pred"] for im in listed["images"])
    confident = client.get("/api/0/images?filter=confident-wrong").json()["images"]
    assert [im["confidence"] for im in confident] == sorted((im["confidence"] for im in confident), reverse=True)
    assert client.get("/api/0/images?filter=class:3").json()["count"] == int(m[3].sum())
    cell = client.get("/api/0/images?filter=cell:1,2").json()
    assert cell["count"] == int(m[1, 2]) and all((im["true"], im["pred"]) == (s.classes[1], s.classes[2])
                                                 for im in cell["images"])
    for which in ("class:\u00b3", "class:10", "cell:1,\u0662", "everything"):
        r = client.get(f"/api/0/images?filter={which}")
        assert r.status_code == 400 and r.json()["error"] == f"unknown list of test images {which!r}", which


# --- numbers and failures ---------------------------------------------------------------------------------------


def test_whole_numbers_are_ascii_digits_and_bounded():
    assert whole_number("0") == 0 and whole_number("007") == 7 and whole_number("999999999") == 999_999_999
    for text in ("", "\u00b2", "\u0663", "\uff11", "-1", "+1", " 1", "1 ", "1.0", "1e3", "1" * 19, "1" * 5000):
        assert whole_number(text) is None, text
    assert whole_number("1000000000") is None and whole_number("10", most=9) is None
    assert whole_number("10", most=10) == 10


def test_a_run_number_too_long_for_int_is_404_not_500(client):
    r = client.get("/api/" + "1" * 5000 + "/predict?image=t0-1")
    assert r.status_code == 404 and r.json() == {"error": FORGOTTEN}


def test_a_failure_is_a_500_logged_in_one_line(client, served, monkeypatch, caplog):
    def broken(self):
        raise RuntimeError("the curves went missing\nsecond line")

    monkeypatch.setattr(Served, "curves", broken)
    with caplog.at_level(logging.ERROR, logger="cnnlab.serve"):
        r = client.get("/api/0/curves")
    assert r.status_code == 500
    assert r.json() == {"error": "the server failed on this request; its log says why"}
    assert r.headers["content-security-policy"] == CSP
    (record,) = [rec for rec in caplog.records if rec.name.startswith("cnnlab.serve")]
    assert record.getMessage() == "GET /api/0/curves answered 500: RuntimeError: the curves went missing\nsecond line"
    assert one_line(cli.as_flags(record.getMessage())).count("\n") == 0


# --- who may talk to the server --------------------------------------------------------------------------------


def test_only_the_servers_own_host_names_are_answered(client, served):
    # DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 asks for a test image.
    r = client.get("/api/0/predict?image=t0-7", headers={"Host": "evil.example:8000"})
    assert r.status_code == 400 and "label" not in r.json()
    assert r.json()["error"].startswith("this server answers to 127.0.0.1, localhost, [::1], not to the host "
                                        "'evil.example:8000'")
    assert r.headers["content-security-policy"] == CSP
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.1"):
        assert client.get("/api/0/curves", headers={"Host": host}).status_code == 200, host
    for host in ("", "127.0.0.1.evil.example", "user@127.0.0.1", "127.0.0.1:80:80", "[::2]:8000", "localhost:x"):
        assert client.get("/api/0/curves", headers={"Host": host}).status_code == 400, host

    # Bound to a port: another port in the Host header is another server's name.
    app = create_app(served, hosts=allowed_hosts("0.0.0.0", ["Explorer.LAN", "[fe80::1]"]), port=8000)
    with TestClient(app, base_url=BASE) as other:
        for host, status in (("127.0.0.1:8000", 200), ("127.0.0.1:9000", 400), ("explorer.lan:8000", 200),
                             ("[fe80::1]:8000", 200), ("0.0.0.0:8000", 400), ("evil.example:8000", 400)):
            assert other.get("/api/0/curves", headers={"Host": host}).status_code == status, host
        message = other.get("/", headers={"Host": "127.0.0.1:9000"}).json()["error"]
        assert message.startswith("this server answers to 127.0.0.1:8000, localhost:8000, [::1]:8000, "
                                  "explorer.lan:8000, [fe80::1]:8000, not to the host '127.0.0.1:9000'")


def test_allowed_host_names():
    assert allowed_hosts("127.0.0.1") == LOOPBACK
    assert allowed_hosts("0.0.0.0", ["a.example", "A.example", "[fe80::1]"]) == (*LOOPBACK, "a.example", "fe80::1")
    assert allowed_hosts("192.168.1.20") == (*LOOPBACK, "192.168.1.20")
    for bad in ("http://a.example", "a.example:8000", "a b", ""):
        with pytest.raises(UserError, match="`allow_hosts`"):
            allowed_hosts("127.0.0.1", [bad])


def test_a_bad_allow_host_is_one_line_naming_the_flag(capsys, tmp_path):
    assert cli.main(["serve", str(tmp_path), "--allow-host", "http://a.example"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnlab serve: error: --allow-host: 'http://a.example' is not a host name")
    assert err.count("\n") == 1


def test_listening_beyond_this_machine_says_which_names_it_answers_to(runs, one_thread, caplog):
    # one_thread: serve() sets one torch thread for small models; the fixture restores the count after the module
    class Listening(Exception):
        pass

    def ready(url: str) -> None:  # stop before serving: the note is said by then
        raise Listening(url)

    with caplog.at_level(logging.WARNING, logger="cnnlab.serve"), pytest.raises(Listening, match=r"http://0\.0\.0\.0:"):
        serve([runs[0]], host="0.0.0.0", port=0, ready=ready, allow_hosts=["box.lan"])
    (note,) = [cli.as_flags(r.getMessage()) for r in caplog.records if r.name == "cnnlab.serve"]
    assert note.startswith("listening on 0.0.0.0: anyone who can reach this machine can use the explorer")
    assert note.endswith("it answers to the names 127.0.0.1, localhost, ::1, box.lan (--allow-host adds one)")


def test_cross_site_posts_are_refused(client, served, picture):
    kept = len(served[0].images)
    body = picture.read_bytes()
    for headers in ({"Origin": "http://evil.example", "Content-Type": "text/plain"},
                    {"Origin": "http://127.0.0.1:9000"}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
                    {"Sec-Fetch-Site": "same-site"}):
        r = client.post("/api/0/upload?name=x.png", content=body, headers=headers)
        assert r.status_code == 403 and r.json()["error"].startswith("refused: a POST must come from this app's own "
                                                                     "page"), headers
    assert len(served[0].images) == kept
    for headers in ({"Origin": BASE}, {"Origin": BASE, "Sec-Fetch-Site": "same-origin"}, {}):
        assert client.post("/api/0/upload?name=x.png", content=body, headers=headers).status_code == 200, headers
    # Reading is not refused by Origin (the browser keeps a cross-site answer from the page).
    assert client.get("/api/0/curves", headers={"Origin": "http://evil.example"}).status_code == 200


# --- the job queue ---------------------------------------------------------------------------------------------


def _spinning(key: str, ran: list[str], seconds: float = 30.0) -> Task:
    """A task that keeps a core busy for ``seconds``, reporting its progress every few milliseconds."""
    def compute(progress):
        ran.append(key)
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            sum(range(20_000))
            progress(elapsed / seconds)
        return {"key": key}

    return Task(key, Path("/nonexistent") / key, {}, compute)


def _drained(*queues: Jobs, timeout: float = 30) -> None:
    """Waits until none of ``queues`` has a task queued or running."""
    deadline = time.monotonic() + timeout
    while any(q.pending() for q in queues):
        assert time.monotonic() < deadline, [q.pending() for q in queues]
        time.sleep(0.05)


def test_the_queue_is_bounded_and_forgets_tasks_nobody_asks_for():
    jobs, ran = Jobs(limit=2, idle=0.5), []
    tasks = [_spinning(f"t{i}", ran) for i in range(4)]
    assert jobs.request(tasks[0]).state == "queued"
    deadline = time.monotonic() + 10
    while jobs.request(tasks[0]).state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [jobs.request(t).ahead for t in tasks[1:3]] == [1, 2]
    with pytest.raises(Busy, match="the server has 2 results to compute before this one"):
        jobs.request(tasks[3])
    assert jobs.request(tasks[1]).state == "queued"  # asked again: still there, one per key
    assert jobs.pending() == ["t0", "t1", "t2"]
    # The running task is the last one asked about, so when it is given up the queued ones are idle too
    # (else one asked a few milliseconds later could still start, whatever the machine's load).
    assert jobs.request(tasks[0]).state == "running"

    # Nobody asks any more: the running task stops at its next progress call, the queued ones never start.
    _drained(jobs, timeout=10)
    assert ran == ["t0"] and jobs.dropped == {"t0": 1, "t1": 1, "t2": 1} and not jobs.computed
    # Asked for again later, a dropped task is queued afresh (and given up again: nobody asks after).
    assert jobs.request(tasks[1]).state == "queued"
    _drained(jobs, timeout=10)
    assert jobs.dropped["t1"] == 2


def test_a_flood_of_requests_leaves_the_worker_idle_once_nobody_asks(runs, served):
    jobs = Jobs(limit=4, idle=1.0)
    flooded = load_runs(runs[:1], jobs=jobs)
    layer = flooded[0].default_layer
    answers = []
    with TestClient(create_app(flooded), base_url=BASE) as c:
        for channel in range(10, 60):
            answers.append(c.get(f"/api/0/channel?layer={layer}&channel={channel}"))
            if answers[-1].status_code == 429:
                break
    assert [r.status_code for r in answers[:-1]] == [200] * (len(answers) - 1)
    assert answers[-1].status_code == 429, [r.status_code for r in answers]
    assert answers[-1].json()["error"] == ("the server has 4 results to compute before this one; ask again when "
                                           "one of them is done")
    accepted = set(jobs.pending()) | set(jobs.computed)
    assert len(accepted) >= 5

    # The client is gone. Within the idle time (and one progress step) nothing is left to do …
    _drained(jobs, served[0].jobs)
    assert jobs.dropped and accepted <= set(jobs.dropped) | set(jobs.computed)
    # … and the process stays idle: no worker computes for a client that does not ask any more.
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(3.0)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    assert cpu < 0.1 * wall, f"{cpu:.2f} s of CPU in {wall:.1f} s after the client stopped"
