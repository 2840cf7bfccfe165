"""The local Ray cluster's start never depends on luck (issue 30): ``--port 0`` picks a port
(HAProxy died on ``bind 127.0.0.1:0``), and a port picked free but taken before it was bound
starts the node again on fresh picks. The start itself is replaced here; tests/integration/
test_ray_start_churn.py starts the real command while other processes churn ports."""

from __future__ import annotations

import pytest

from handlers import ray_serve as command
from handlers.servers import ray_cluster

HAPROXY_TAKEN = ("HAProxy crashed during startup: [NOTICE] (30265) : haproxy version is 2.8.25\n"
                 "[ALERT] (30265) : Binding [/tmp/ray-x/haproxy/cfg:50] for frontend http_frontend: cannot bind "
                 "socket (Address already in use) for [127.0.0.1:{port}]\n")
PYTHON_PROXY_TAKEN = "Failed to bind to address '127.0.0.1:{port}'."


def test_a_taken_port_is_read_from_either_proxys_failure_anywhere_in_the_chain():
    assert ray_cluster.port_taken(RuntimeError(HAPROXY_TAKEN.format(port=40123))) == 40123
    assert ray_cluster.port_taken(RuntimeError(PYTHON_PROXY_TAKEN.format(port=8000))) == 8000
    try:
        try:
            raise RuntimeError(HAPROXY_TAKEN.format(port=21000))
        except RuntimeError as inner:
            raise ValueError("ray.exceptions.RayTaskError") from inner
    except ValueError as outer:
        assert ray_cluster.port_taken(outer) == 21000
    assert ray_cluster.port_taken(RuntimeError("HAProxy crashed during startup: invalid port '0'")) is None


class FakeStarts:
    """``ray_cluster._start`` and ``stop_local_cluster`` replaced: the first ``taken`` starts fail
    as HAProxy fails on a taken port (the HTTP port, or the stats port it was given)."""

    def __init__(self, monkeypatch, taken: int, which: str = "http"):
        self.starts, self.stops, self.taken, self.which = [], 0, taken, which
        monkeypatch.setattr(ray_cluster, "_start", self.start)
        monkeypatch.setattr(ray_cluster, "stop_local_cluster", self.stop)

    def start(self, temp_dir, http_port, num_cpus, proxy, api_key):
        self.starts.append(http_port)
        if len(self.starts) <= self.taken:
            port = http_port if self.which == "http" else 23456
            raise RuntimeError(HAPROXY_TAKEN.format(port=port))

    def stop(self, temp_dir=None, deadline_s=5.0):
        self.stops += 1


def test_port_0_picks_a_port_and_a_picked_port_taken_before_it_is_bound_is_picked_again(tmp_path, monkeypatch):
    starts = FakeStarts(monkeypatch, taken=1)
    started = ray_cluster.start_local_cluster(str(tmp_path), 0, proxy="haproxy")
    assert len(starts.starts) == 2 and starts.stops == 1  # the failed node stopped before the next
    assert 0 not in starts.starts and started.port == starts.starts[-1] and started.proxy == "haproxy"
    assert starts.starts[0] != starts.starts[1]


def test_a_node_port_taken_is_picked_again_even_with_a_named_http_port(tmp_path, monkeypatch):
    starts = FakeStarts(monkeypatch, taken=2, which="stats")
    assert ray_cluster.start_local_cluster(str(tmp_path), 8123, proxy="haproxy").port == 8123
    assert starts.starts == [8123, 8123, 8123] and starts.stops == 2


def test_a_named_port_that_is_taken_is_refused_at_once_naming_it(tmp_path, monkeypatch):
    starts = FakeStarts(monkeypatch, taken=5)
    with pytest.raises(ray_cluster.PortInUse, match="port 8123 on 127.0.0.1 is in use"):
        ray_cluster.start_local_cluster(str(tmp_path), 8123, proxy="haproxy")
    assert starts.starts == [8123] and starts.stops == 1


def test_picked_ports_taken_every_time_give_up_after_the_attempts(tmp_path, monkeypatch):
    starts = FakeStarts(monkeypatch, taken=99)
    with pytest.raises(ray_cluster.PortInUse, match="starts in a row"):
        ray_cluster.start_local_cluster(str(tmp_path), 0, proxy="haproxy")
    assert len(starts.starts) == ray_cluster.START_ATTEMPTS == starts.stops


def test_any_other_start_failure_is_raised_as_it_was(tmp_path, monkeypatch):
    def failing(*args):
        raise RuntimeError("HAProxy crashed during startup: something else")

    monkeypatch.setattr(ray_cluster, "_start", failing)
    monkeypatch.setattr(ray_cluster, "stop_local_cluster", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="something else"):
        ray_cluster.start_local_cluster(str(tmp_path), 0, proxy="haproxy")


@pytest.mark.parametrize("port", ["-1", "65536", "eighty"])
def test_the_command_refuses_a_port_that_is_none_in_one_line_before_anything_starts(port, capsys):
    with pytest.raises(SystemExit) as exited:
        command.main(["--port", port, "--no-token-auth"])
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"python -m handlers.ray_serve: error: argument --port: must be a TCP port, 1-65535, or 0 "
                      f"for a free one; got '{port}'"]


def test_stopping_after_a_start_that_failed_before_ray_started_starts_no_ray(tmp_path, monkeypatch):
    """A failed start is stopped before it is tried again or reported; stopping called
    serve.shutdown(), which starts a Ray node (dashboard and all, 48 s here) when none runs."""
    import ray
    from ray import serve

    calls = []
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))
    assert not ray.is_initialized()
    ray_cluster.stop_local_cluster(str(tmp_path))
    assert calls == [] and not ray.is_initialized()
