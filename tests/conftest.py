"""Shared test set-up: a private cache per test session, and the shared CIFAR-10 archive if present."""

import os
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
def one_thread():
    """One torch thread for a test module whose tensors are tiny: on a CPU shared with other jobs,
    two threads spin-waiting on each other make optimisation loops ten times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
