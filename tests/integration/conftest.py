"""One real TorchServe (Java) per test session, serving archives built by the real command."""

import uuid
from pathlib import Path

import pytest

from scripts.torchserve_instance import Ports, TorchServe

ROOT = Path(__file__).resolve().parents[2]


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
