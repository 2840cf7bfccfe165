"""One real TorchServe (Java) per test session, serving archives built by the real command."""

import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from handlers.packaging.archive import archive_config
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
    # The same, one request per model call: a busy model for the deadline tests.
    archive_config(
        ROOT / "archiver_configs" / "quickstart.yaml", model_store,
        model_name="faults_one_by_one",
        handler=Path(__file__).resolve().parent / "fault_handler.py",
        model_config={
            "batchSize": 8, "maxBatchDelay": 200, "minWorkers": 1, "maxWorkers": 1, "responseTimeout": 30,
            "handler": {"micro_batch_size": 1, "pool_size": 2},
        },
    )
    return "faults"


@pytest.fixture(scope="session")
def readme_handler_config(tmp_path_factory):
    """The README walkthrough's project (model, weights, samples, handler, archiver config) made
    from its blocks as they stand, served as ``readme_handler``."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.docs_blocks import blocks_named

    folder = tmp_path_factory.mktemp("readme_handler")
    blocks = blocks_named("walkthrough")
    for block in blocks:
        if block.file_name:
            (folder / block.file_name).write_text(block.text)
    [weights] = [block for block in blocks if "torch.save" in block.text and not block.file_name]
    [samples] = [block for block in blocks if "samples/" in block.text and not block.file_name]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for step in (weights, samples):
        subprocess.run(["bash", "-c", step.text], cwd=folder, env=env, check=True)
    config = yaml.safe_load((folder / "my_model.yaml").read_text())
    config.update(model_name="readme_handler")
    path = folder / "readme_handler.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def readme_archive(model_store, readme_handler_config):
    archive_config(readme_handler_config, model_store)
    return "readme_handler"


@pytest.fixture(scope="session")
def flat_detector_declared(model_store, tmp_path_factory):
    """The flat detector (examples/flat_detector) with its boxes' batch index declared
    (``handler.batch_dims: {output: {index_column: 0}}``), archived beside the examples as
    ``flat_detector_declared`` when the config passes the check and the self-test. Otherwise
    ``refused`` says why (the code before issue 29's fix has no such declaration) and the
    session's other models are served as usual. ``config``: its archiver config, for Ray Serve."""
    from bench.detector_contract import DECLARED_NAME, declared_config
    from handlers.packaging.archive import ArchiveConfigError, archive, load_spec, self_test

    config = declared_config(tmp_path_factory.mktemp("flat_detector_declared"))
    try:
        spec = load_spec(config)
        self_test(spec)
        archive(spec, model_store)
    except ArchiveConfigError as exc:
        return SimpleNamespace(name=DECLARED_NAME, config=config, refused=str(exc))
    return SimpleNamespace(name=DECLARED_NAME, config=config, refused=None)


@pytest.fixture(scope="session")
def torchserve(model_store, fault_archive, readme_archive, flat_detector_declared, tmp_path_factory):
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
