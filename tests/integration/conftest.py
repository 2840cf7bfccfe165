"""One real TorchServe (Java) per test session, serving archives built by the real command."""

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from scripts.torchserve_instance import Ports, TorchServe

ROOT = Path(__file__).resolve().parents[2]


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
def torchserve(model_store, tmp_path_factory):
    server = TorchServe(
        tmp_path_factory.mktemp("torchserve"), model_store, ROOT / "config.properties", ports=Ports.free()
    )
    server.start()
    try:
        server.wait_ready(sorted(p.stem for p in model_store.glob("*.mar")))
        yield server
    finally:
        server.stop()


@pytest.fixture
def unique():
    return lambda: uuid.uuid4().hex[:12]
