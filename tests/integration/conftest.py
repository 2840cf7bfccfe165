"""One real TorchServe (Java) per test session, serving archives built by the real command."""

import uuid
from pathlib import Path

import pytest

from handlers.archive import archive_config
from scripts.torchserve_instance import Ports, TorchServe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def fault_archive(model_store):
    """The test-only faulty model (fault_handler.py) beside the examples, as ``faults``."""
    archive_config(
        ROOT / "archiver_configs" / "quickstart.yaml", ROOT, model_store,
        model_name="faults",
        handler=Path(__file__).resolve().parent / "fault_handler.py",
        model_config={
            "batchSize": 8, "maxBatchDelay": 100, "minWorkers": 1, "maxWorkers": 1, "responseTimeout": 30,
            "handler": {"micro_batch_size": 8, "pool_size": 2, "deadline_s": 2.0},
        },
    )
    return "faults"


@pytest.fixture(scope="session")
def torchserve(model_store, fault_archive, tmp_path_factory):
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
