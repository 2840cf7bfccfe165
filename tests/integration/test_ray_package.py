"""The Ray Serve package of python -m handlers.export_ray, started as a user starts it: exported
from quickstart's archiver config, packed as model.tar.gz and unpacked, its code/requirements.txt
installed into a fresh venv (nothing of this checkout: the package carries handlers/), then
``serve run config.yaml`` from the unpacked folder, unchanged, and ``serve deploy config.yaml`` to a
head node started in it. The model answers at /predictions/quickstart and through SageMaker's
/invocations, /ping says it is healthy.

The fresh venv costs a pip install of ray and torch (3.5 min on the 2-core machine, from its local
wheels; 6.5 min in all): this runs only with MICROBATCH_PACKAGE_TEST=1 (``make test-package``).
MICROBATCH_PACKAGE_VENV=DIR reuses a venv made from the same requirements, for reruns. Ray runs as
the project's tests run it: its own temp dir, loopback, dashboard off (a head node started by
``ray.init`` in a process of the fresh venv; ``serve run --address`` joins it)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import requests

from scripts.torchserve_instance import free_port

pytestmark = [
    pytest.mark.integration, pytest.mark.timeout(900),
    pytest.mark.skipif(not os.environ.get("MICROBATCH_PACKAGE_TEST"),
                       reason="a fresh venv with ray and torch (minutes): set MICROBATCH_PACKAGE_TEST=1"),
]

ROOT = Path(__file__).resolve().parents[2]
READY_S = 420
HEAD = """import ray, sys
ray.init(include_dashboard=False, _temp_dir=sys.argv[1], _node_ip_address="127.0.0.1", num_cpus=2)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # holds the node until the test closes this pipe
"""


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The package, exported, packed as model.tar.gz and unpacked elsewhere (as a container does)."""
    folder = tmp_path_factory.mktemp("ray_package")
    port = free_port()
    subprocess.run([sys.executable, "-m", "handlers.export_ray", str(ROOT / "archiver_configs" / "quickstart.yaml"),
                    "--out", str(folder / "exported"), "--tar", str(folder / "model.tar.gz"), "--port", str(port)],
                   cwd=ROOT, check=True, timeout=300)
    unpacked = folder / "unpacked"
    with tarfile.open(folder / "model.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    return unpacked, port


def clean_env() -> dict:
    """This environment less Python's and Ray's settings, plus the project's Ray settings (loopback
    only: RAY_ENVIRONMENT) and Ray's Python proxy (HAProxy is this machine's, not the venv's)."""
    from handlers.servers.ray_cluster import RAY_ENVIRONMENT

    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "RAY_", "VIRTUAL_ENV"))}
    return {**env, **RAY_ENVIRONMENT, "RAY_SERVE_ENABLE_HA_PROXY": "0"}


# Ray 2.60's token authentication, on: the head and serve run's driver share this one (serve run
# joins the node; without it the head's own token, kept in its process, refuses the driver).
RAY_TOKEN = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture(scope="module")
def fresh_venv(package, tmp_path_factory):
    unpacked, _ = package
    reused = os.environ.get("MICROBATCH_PACKAGE_VENV")
    venv = Path(reused) if reused else tmp_path_factory.mktemp("fresh") / "venv"
    if not reused:
        started = time.monotonic()
        base_python = getattr(sys, "_base_executable", sys.executable)  # not this venv's
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(unpacked / "code" / "requirements.txt")],
                       check=True, env=clean_env(), timeout=600)
        print(f"\nfresh venv from code/requirements.txt in {time.monotonic() - started:.0f} s")
    # Fresh: this project is not importable there, except from the package's own folder.
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import handlers"], env=clean_env(), cwd="/",
                          capture_output=True).returncode != 0
    return venv


@pytest.fixture(scope="module")
def served(package, fresh_venv, tmp_path_factory):
    from handlers.servers.ray_cluster import _end_processes_naming

    unpacked, port = package
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live there
    log = tmp_path_factory.mktemp("serve_run") / "serve_run.log"
    head = subprocess.Popen([str(fresh_venv / "bin" / "python"), "-c", HEAD, temp_dir], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**clean_env(), **RAY_TOKEN}, cwd=temp_dir)
    serve_run = None
    try:
        address = head.stdout.readline().strip()
        assert address, "the Ray head did not start"
        with open(log, "w") as out:
            serve_run = subprocess.Popen(
                [str(fresh_venv / "bin" / "serve"), "run", "--address", address, "config.yaml"],
                cwd=unpacked, env={**clean_env(), **RAY_TOKEN}, stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_S
        while True:
            assert serve_run.poll() is None, f"serve run ended:\n{log.read_text()[-4000:]}"
            try:
                if requests.get(f"{base}/ping", timeout=10).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or no route yet
                pass
            assert time.monotonic() < deadline, f"not healthy after {READY_S} s:\n{log.read_text()[-4000:]}"
            time.sleep(2)  # no event to wait on: the package is another process tree
        yield base
    finally:
        if serve_run is not None and serve_run.poll() is None:
            serve_run.terminate()
            try:
                serve_run.wait(30)
            except subprocess.TimeoutExpired:
                serve_run.kill()
        head.stdin.close()  # the head's driver ends, and its node with it
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            head.kill()
        _end_processes_naming(temp_dir)  # what outlives the driver, by our temp dir alone
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_package_holds_the_serve_config_deployment_and_requirements(package):
    unpacked, port = package
    import yaml

    config = yaml.safe_load((unpacked / "config.yaml").read_text())
    assert config["http_options"] == {"host": "127.0.0.1", "port": port}
    assert [(a["name"], a["route_prefix"], a["import_path"]) for a in config["applications"]] == [
        ("quickstart", "/predictions/quickstart", "deployment:model"), ("sagemaker", "/", "deployment:sagemaker")]
    assert (unpacked / "models" / "quickstart.mar").is_file() and (unpacked / "handlers" / "__init__.py").is_file()
    requirements = (unpacked / "code" / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("ray[serve]==") for line in requirements)
    assert any(line.startswith("torch>=") for line in requirements)


def test_serve_run_starts_the_unpacked_package_in_a_fresh_venv(served):
    body = {"id": "a", "x": [1, 2, 3, 4]}
    predicted = requests.post(f"{served}/predictions/quickstart", data=json.dumps(body),
                              headers={"Content-Type": "application/json"}, timeout=60)
    assert predicted.status_code == 200 and predicted.json() == {"id": "a", "y": [3.0, 5.0, 7.0, 9.0]}
    invoked = requests.post(f"{served}/invocations", data=json.dumps(body),
                            headers={"Content-Type": "application/json"}, timeout=60)
    assert invoked.status_code == 200 and invoked.json() == predicted.json()
    assert invoked.headers["Content-Type"] == "application/json"
    bad = requests.post(f"{served}/invocations", data=json.dumps({"id": "b"}),
                        headers={"Content-Type": "application/json"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["type"] == "BadRequest"
    ping = requests.get(f"{served}/ping", timeout=30)
    assert ping.status_code == 200 and ping.json() == {"status": "Healthy"}
    assert requests.get(f"{served}/nothing-here", timeout=30).status_code == 404


# ray start's fixed default ports (client server 10001, dashboard 8265, its agent 52365, workers
# 10002-19999) would meet another cluster's on a shared machine: each is given a free one.
PORT_OPTIONS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
                "--node-manager-port", "--object-manager-port")


def test_serve_deploy_starts_the_package_on_a_head_node_started_in_its_folder(fresh_venv, tmp_path):
    """As docs/from_torchserve.md says: ``ray start --head`` from the package's folder (its workers
    then import deployment and handlers), then ``serve deploy config.yaml`` through the dashboard."""
    from handlers.servers.ray_cluster import _end_processes_naming

    port = free_port()
    package = tmp_path / "package"
    subprocess.run([sys.executable, "-m", "handlers.export_ray", str(ROOT / "archiver_configs" / "quickstart.yaml"),
                    "--out", str(package), "--port", str(port)], cwd=ROOT, check=True, timeout=300)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**clean_env(), **RAY_TOKEN}
    ports = {option: free_port() for option in PORT_OPTIONS}
    workers = free_port()
    try:
        subprocess.run([str(fresh_venv / "bin" / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
                        "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir, "--num-cpus", "2",
                        "--min-worker-port", str(workers), "--max-worker-port", str(workers + 50),
                        "--disable-usage-stats", *[str(x) for pair in ports.items() for x in pair]],
                       cwd=package, env=env, check=True, timeout=180, capture_output=True)
        subprocess.run([str(fresh_venv / "bin" / "serve"), "deploy", "config.yaml", "-a",
                        f"http://127.0.0.1:{ports['--dashboard-port']}"], cwd=package, env=env, check=True, timeout=180,
                       capture_output=True)
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + READY_S
        while True:
            try:
                if requests.get(f"{base}/ping", timeout=10).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            assert time.monotonic() < deadline, f"not healthy after {READY_S} s"
            time.sleep(2)  # no event to wait on: the cluster is another process tree
        answer = requests.post(f"{base}/predictions/quickstart", data=json.dumps({"id": "a", "x": [1, 2, 3, 4]}),
                               headers={"Content-Type": "application/json"}, timeout=60)
        assert answer.status_code == 200 and answer.json() == {"id": "a", "y": [3.0, 5.0, 7.0, 9.0]}
    finally:
        _end_processes_naming(temp_dir)  # ray start's daemons, by our temp dir (ray stop ends every cluster)
        shutil.rmtree(temp_dir, ignore_errors=True)
