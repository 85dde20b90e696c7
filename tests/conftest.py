"""Shared test set-up: a private cache per test session, the shared CIFAR-10 archive if present, a small
trained run (and copies of it to serve), and headless Chromium for the pages."""

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    # Decoded datasets are cached by content hash; one cache per session keeps tests independent
    # of the user's ~/.cache while letting tests in the same session share a decode.
    old = os.environ.get("CNNLAB_CACHE")
    os.environ["CNNLAB_CACHE"] = str(tmp_path_factory.mktemp("cnnlab-cache"))
    yield
    if old is None:
        os.environ.pop("CNNLAB_CACHE", None)
    else:
        os.environ["CNNLAB_CACHE"] = old


@pytest.fixture(scope="session")
def cifar10_jpeg() -> Path:
    """The full CIFAR-10 JPEG archive named by CNNLAB_CIFAR10_JPEG (set by .ci/run)."""
    path = os.environ.get("CNNLAB_CIFAR10_JPEG")
    if not path or not Path(path).is_file():
        pytest.skip("set CNNLAB_CIFAR10_JPEG to the cifar10-jpeg.tar.gz archive to run tests on real data")
    return Path(path)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """One small model trained once per session on the bundled sample, for the commands that read runs."""
    from cnnlab.config import resolve
    from cnnlab.train.engine import train

    cfg = resolve(overrides=dict(recipe="fast", dataset="sample", model="resnet18-cifar", width=8, image_size=32,
                                 epochs=1, batch_size=128, lr=0.2, limit_train=1000, limit_test=200, device="cpu",
                                 out=str(tmp_path_factory.mktemp("small") / "run")))
    return train(cfg).run_dir


@pytest.fixture(scope="module")
def runs(small_run, tmp_path_factory) -> list[Path]:
    """Two copies of the session's small run for a module that serves it (the explorer writes its cache into
    a run folder), without what other tests wrote into it: a ``viz/sanity/sanity.json`` of two methods
    would be the trust table."""
    root = tmp_path_factory.mktemp("serve")
    copies = [root / "run-a", root / "run-b"]
    for copy in copies:
        shutil.copytree(small_run, copy, ignore=shutil.ignore_patterns("explore", "tb", "viz"))
    return copies


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module whose tensors are tiny: on a CPU shared with other jobs,
    two threads spin-waiting on each other make optimisation loops ten times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium (``.ci/run`` installs it) driven by Playwright (the ``test`` extra); nothing is
    downloaded. Skips, saying why, where either is missing."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package (.ci/run does) to test pages "
                    "in a browser")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed: pip install -e '.[test]'")
    with sync_api.sync_playwright() as p:
        # CI runs as root, where Chromium's sandbox cannot start.
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()
