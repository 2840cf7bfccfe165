"""Two TorchServes on one machine, as docs/operating.md runs them: a config from
``python -m handlers.torchserve_config --port`` each (every port and the worker sockets moved),
its own ``TMPDIR`` (pid file), ``TEMP`` (Java's: worker sockets, unpacked archives) and folder
(key file, logs), one model store for both. Both answer at once, and each stops alone."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from scripts.torchserve_instance import POLL_S, WORKER_EXIT_S, TorchServe, read_properties

from .helpers import concurrently

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# Below Linux's ephemeral range (32768-60999), where the other test sessions' free ports come from.
FIRST_BASE, LAST_BASE = 20000, 29000


def tcp_ports(properties):
    return [int(properties[key].rsplit(":", 1)[-1]) for key in (
        "inference_address", "management_address", "metrics_address", "grpc_inference_port", "grpc_management_port")]


def is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def generated_configs(folder):
    """Two configs printed by the command, ``--port BASE`` and ``--port BASE+100`` (as the doc's
    8080 and 8180), for a BASE whose ports are all free here."""
    for base in range(FIRST_BASE + 1010, LAST_BASE, 1000):
        paths = []
        for port in (base, base + 100):
            printed = subprocess.run([sys.executable, "-m", "handlers.torchserve_config", "--port", str(port)],
                                     cwd=ROOT, capture_output=True, text=True, check=True).stdout
            path = folder / f"config_{port}.properties"
            path.write_text(printed)
            paths.append(path)
        if all(is_free(p) for path in paths for p in tcp_ports(read_properties(path))):
            return paths
    pytest.fail(f"no free ports for two TorchServes between {FIRST_BASE} and {LAST_BASE}")


def predict(server, body):
    return requests.post(f"{server.inference_url}/predictions/quickstart", data=json.dumps(body),
                         headers={"Content-Type": "application/json", **server.auth()}, timeout=60)


def stop_as_documented(server):
    """``torchserve --stop --foreground`` with the instance's TMPDIR, from its folder; then wait
    for its workers, which end after the frontend."""
    subprocess.run([str(server.python_bin / "torchserve"), "--stop", "--foreground"], cwd=server.workdir,
                   env=server.env(), check=True, stdout=subprocess.DEVNULL, timeout=90)
    deadline = time.monotonic() + WORKER_EXIT_S
    while server.processes() and time.monotonic() < deadline:
        time.sleep(POLL_S)  # processes we did not start as children: nothing to wait on


def test_two_torchserves_from_generated_configs_answer_at_once_and_stop_alone(model_store, tmp_path):
    configs = generated_configs(tmp_path)
    first, second = (
        TorchServe(tmp_path / f"instance_{i}", model_store, config, extra_properties={"load_models": "quickstart.mar"})
        for i, config in enumerate(configs))
    properties = [read_properties(path) for path in configs]
    numbers = [n for props in properties for n in tcp_ports(props) + [int(props["initial_worker_port"])]]
    assert len(set(numbers)) == len(numbers) == 12, f"two instances share a port: {properties}"
    servers = (first, second)
    try:
        for server in servers:  # both start together; each returns at once
            server.start()
        for server in servers:
            server.wait_ready(["quickstart"], timeout=120)
        assert first.pid() != second.pid() and first.running() and second.running()
        for server, props in zip(servers, properties):  # each worker's socket: its own folder, its own number
            assert (server.tmp / f".ts.sock.{props['initial_worker_port']}").exists()
        assert first.keys()["inference"] != second.keys()["inference"]
        refused = requests.post(f"{second.inference_url}/predictions/quickstart", data='{"x": [1, 2, 3, 4]}',
                                headers={"Content-Type": "application/json", **first.auth()}, timeout=30)
        assert refused.status_code in (400, 401, 403), "one instance's token opened the other"

        calls = 32  # released together, alternating between the two instances

        def call(i):
            return predict(servers[i % 2], {"id": f"call-{i}", "x": [1, 2, 3, 4]})

        responses = concurrently(calls, call)
        assert [r.status_code for r in responses] == [200] * calls, [r.text for r in responses]
        assert [r.json() for r in responses] == [{"id": f"call-{i}", "y": [3.0, 5.0, 7.0, 9.0]} for i in range(calls)]

        second_processes = sorted(second.processes())
        assert len(second_processes) >= 2 and not set(second_processes) & set(first.processes())
        stop_as_documented(first)
        assert first.processes() == [] and first.pid() is None
        assert sorted(second.processes()) == second_processes and second.running()
        assert predict(second, {"id": "after", "x": [1, 2, 3, 4]}).json() == {"id": "after", "y": [3.0, 5.0, 7.0, 9.0]}
        assert not (first.workdir / "key_file.json").exists() and (second.workdir / "key_file.json").exists()
        stop_as_documented(second)
        assert second.processes() == [] and second.pid() is None
    finally:
        for server in servers:  # after a failure: whatever is left of them, and only that
            server.stop()
