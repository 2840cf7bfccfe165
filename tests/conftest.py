"""Fixtures shared by unit and integration tests: the archives, built once per session by the
real command (python -m handlers.archive → torch-model-archiver)."""

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests: a short, reproducible profile for CI and everyday runs; a long one for a soak
# (HYPOTHESIS_PROFILE=soak). deadline=None: a batch's time is the engine's business, not Hypothesis's.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("soak", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from handlers.testing import start_archived_handler

ROOT = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """What is alive as a test starts is frozen (gc.freeze): later collections leave it out. By
    the unit tests a full run holds 0.9 million objects (torch, Ray's driver, earlier tests'
    leftovers), and a full collection over them stopped every thread of this process for up to
    1 s, which the tests timed against a deadline then counted against the engine. Cyclic garbage
    left by earlier tests is never freed: the price, little in a test process."""
    gc.freeze()


@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("model_store")
    result = subprocess.run(
        [sys.executable, "-m", "handlers.archive", "--model-store", str(store)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return store


@pytest.fixture(scope="session")
def archived_handler(model_store, tmp_path_factory):
    """``archived_handler("digits")``: that example's .mar unpacked and its handler started, as a
    TorchServe worker would (one per model per session)."""
    started = {}

    def start(model_name):
        if model_name not in started:
            workdir = tmp_path_factory.mktemp(f"unpacked_{model_name}")
            started[model_name] = start_archived_handler(model_store / f"{model_name}.mar", workdir)
        return started[model_name]

    yield start
    for handler in started.values():
        handler.close()


@pytest.fixture(scope="session")
def aot_mar(tmp_path_factory):
    """quickstart with AOTInductor packages built into its ``.mar`` (tests/aot_archive.py), once per
    session (15-30 s here), shared by the unit tests and the servers'."""
    from tests.aot_archive import build

    return build(tmp_path_factory.mktemp("aot_store"))
