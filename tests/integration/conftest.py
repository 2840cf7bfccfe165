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
        ROOT / "archiver_configs" / "quickstart.yaml", model_store,
        model_name="faults",
        handler=Path(__file__).resolve().parent / "fault_handler.py",
        model_config={
            "batchSize": 8, "maxBatchDelay": 100, "minWorkers": 1, "maxWorkers": 1, "responseTimeout": 30,
            "handler": {"micro_batch_size": 8, "pool_size": 2, "deadline_s": 2.0},
        },
    )
    return "faults"


def readme_handler_code() -> str:
    """The README's "Write a handler" example, as a user would paste it."""
    section = (ROOT / "README.md").read_text().split("## Write a handler", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="session")
def readme_handler_config(tmp_path_factory):
    """An archiver config serving the README's handler, unchanged, with the quickstart model
    (y = 2x + 1), as ``readme_handler``."""
    import yaml

    folder = tmp_path_factory.mktemp("readme_handler")
    (folder / "my_handler.py").write_text(readme_handler_code())
    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    config.update(model_name="readme_handler", handler=str(folder / "my_handler.py"))
    for key in ("model_file", "serialized_file"):
        config[key] = str(ROOT / config[key])
    config["build"] = [arg if not arg.startswith(("examples/", "build/")) else str(ROOT / arg) for arg in config["build"]]
    path = folder / "readme_handler.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def readme_archive(model_store, readme_handler_config):
    archive_config(readme_handler_config, model_store)
    return "readme_handler"


@pytest.fixture(scope="session")
def torchserve(model_store, fault_archive, readme_archive, tmp_path_factory):
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
