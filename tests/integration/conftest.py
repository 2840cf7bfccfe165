"""One real TorchServe (Java) per test session, serving archives built by the real command; one
private local Ray cluster shared by the modules marked ``shared_ray``."""

import shutil
import tempfile
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
def aot_archive(model_store, aot_mar):
    """The session's AOT archive (tests/conftest.py ``aot_mar``) beside the examples; returns its
    model name."""
    shutil.copy2(aot_mar, model_store / aot_mar.name)
    return aot_mar.stem


@pytest.fixture(scope="session")
def legacy_archive(model_store, tmp_path_factory):
    """tests/legacy_mar.py's archive (a stock TorchServe ``BaseHandler`` subclass, archived by the
    real torch-model-archiver) beside the examples, as ``legacy``; returns the folder that holds
    its sources (``legacy_src``) and the archive as built."""
    from tests.legacy_mar import NAME, build_legacy_mar

    folder = tmp_path_factory.mktemp("legacy_mar")
    shutil.copy2(build_legacy_mar(folder), model_store / f"{NAME}.mar")  # the sources stay out of the store
    return folder


# Package scope: the server stops after the last integration test, so that the unit tests after
# them (some timed against a deadline) have the 2 cores to themselves.
@pytest.fixture(scope="package")
def torchserve(model_store, fault_archive, readme_archive, flat_detector_declared, legacy_archive, aot_archive,
               tmp_path_factory):
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


class SharedRay:
    """A private local Ray cluster (loopback, dashboard off, HAProxy in front, its own temp dir
    under /tmp: Ray's unix sockets live there), started on first use. Ray allows one cluster per
    process, and each start costs 10-20 s on the 2-core machine: the modules marked
    ``shared_ray`` deploy their applications on this one (and delete them at their end), run
    one after another (:func:`pytest_collection_modifyitems`), and the cluster stops after the
    last of their tests (:func:`pytest_runtest_teardown`)."""

    # Logical CPUs: test_ray_serve's replicas reserve 9 (two examples 2 each, the rest 1), beside
    # its tests' own deployments (one at a time); they share the machine's cores.
    NUM_CPUS = 12
    # How often Ray's processes hand their metrics to the metrics port (Ray's default: 10 s): the
    # tests that read the handlers' metrics there wait a few of these for them to settle.
    METRICS_REPORT_MS = "1000"

    def __init__(self):
        self.temp_dir = None
        self.port = None
        self.environment = None

    def url(self) -> str:
        """The HTTP ingress's base URL, the cluster started if it is not running."""
        if self.temp_dir is None:
            from handlers.servers.ray_cluster import start_local_cluster

            temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
            self.environment = pytest.MonkeyPatch()
            self.environment.setenv("RAY_metrics_report_interval_ms", self.METRICS_REPORT_MS)  # read as Ray starts
            try:
                # Port 0: the cluster picks its port and binds it, picking again should it be taken meanwhile.
                self.port = start_local_cluster(temp_dir, 0, num_cpus=self.NUM_CPUS).port
            except BaseException:
                self.environment.undo()
                shutil.rmtree(temp_dir, ignore_errors=True)
                raise
            self.temp_dir = temp_dir
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.temp_dir is None:
            return
        from handlers.servers.ray_cluster import stop_local_cluster

        try:
            stop_local_cluster(self.temp_dir)
        finally:
            self.environment.undo()
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = self.port = None


SHARED_RAY = SharedRay()


@pytest.fixture(scope="session")
def shared_ray():
    """The :class:`SharedRay` of this session (``shared_ray.url()`` starts it)."""
    return SHARED_RAY


def _shares_ray(item) -> bool:
    return item.get_closest_marker("shared_ray") is not None


def pytest_collection_modifyitems(items):
    """The tests of the modules marked ``shared_ray`` one after another, where the first of them was."""
    sharing = [item for item in items if _shares_ray(item)]
    if sharing:
        first = items.index(sharing[0])
        others = [item for item in items if not _shares_ray(item)]
        items[:] = others[:first] + sharing + others[first:]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)  # the module's fixtures first: they delete their applications
    finally:
        if _shares_ray(item) and (nextitem is None or not _shares_ray(nextitem)):
            SHARED_RAY.stop()


def pytest_sessionfinish(session):
    SHARED_RAY.stop()  # a session that ended early (-x, Ctrl-C)
