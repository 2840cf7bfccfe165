"""Fixtures shared by unit and integration tests: the archives, built once per session by the
real command (python -m handlers.archive → torch-model-archiver)."""

import subprocess
import sys
from pathlib import Path

import pytest

from handlers.testing import start_archived_handler

ROOT = Path(__file__).resolve().parents[1]


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
