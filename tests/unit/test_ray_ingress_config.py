"""The private Ray cluster's ingress settings, without Ray: HAProxy's files under the node's temp
dir, its listeners on loopback (the wrapper script that rewrites Ray's config), the Python proxy
as the fallback."""

import subprocess
from pathlib import Path

import pytest

from handlers.servers.ray_cluster import LOOPBACK_ONLY, NoHAProxy, node_environment

# The listeners of the HAProxy config Ray 2.60 writes (ray/serve/_private/haproxy_templates.py).
RAY_CONFIG = """frontend prometheus
    bind :9101
frontend http_frontend
    bind 127.0.0.1:8000
listen stats
  bind *:8404
"""


@pytest.fixture
def fake_haproxy(tmp_path, monkeypatch):
    """An "HAProxy" that writes the arguments it was given and its config, as it ran."""
    binary = tmp_path / "fake-haproxy"
    binary.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$(dirname "$0")/args"\ncat "$3" > "$(dirname "$0")/seen.cfg"\n')
    binary.chmod(0o755)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(binary))
    for key in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_LOG_TARGET",
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


def test_haproxy_runs_with_its_metrics_and_stats_listeners_moved_to_loopback(fake_haproxy, tmp_path):
    environment = node_environment("haproxy", str(tmp_path / "ray"))
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_CONFIG)
    arguments = ["-db", "-f", str(config), "-dR", "-sf", "123"]
    subprocess.run([environment["RAY_SERVE_HAPROXY_BINARY_PATH"], *arguments], check=True, timeout=30)
    assert (fake_haproxy / "args").read_text().split("\n")[:-1] == arguments  # Ray's arguments, unchanged
    assert (fake_haproxy / "seen.cfg").read_text() == RAY_CONFIG.replace(
        "bind :9101", "bind 127.0.0.1:9101").replace("bind *:8404", "bind 127.0.0.1:8404")


def test_haproxy_keeps_its_files_in_the_node_temp_dir_on_free_ports_and_stops_without_the_30_s_drain(fake_haproxy,
                                                                                                       tmp_path):
    temp_dir = tmp_path / "ray"
    environment = node_environment("haproxy", str(temp_dir))
    assert environment["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and environment[LOOPBACK_ONLY] == "1"
    for key in ("RAY_SERVE_HAPROXY_BINARY_PATH", "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE",
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH", "RAY_SERVE_HAPROXY_LOG_TARGET"):
        assert Path(environment[key]).is_relative_to(temp_dir), key
    ports = [int(environment[key]) for key in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT",
                                               "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")]
    assert 9101 not in ports and 8404 not in ports and 8500 not in ports
    assert environment["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"


def test_ports_set_in_the_environment_are_kept(fake_haproxy, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "9101")
    assert node_environment("haproxy", str(tmp_path / "ray"))["RAY_SERVE_HAPROXY_METRICS_PORT"] == "9101"


def test_the_python_proxy_fallback_turns_haproxy_off_and_needs_no_binary(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "missing"))
    environment = node_environment("python", str(tmp_path / "ray"))
    assert environment["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert not any(key.startswith("RAY_SERVE_HAPROXY_") for key in environment)


def test_without_an_haproxy_binary_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "missing"))
    with pytest.raises(NoHAProxy, match="--python-proxy"):
        node_environment("haproxy", str(tmp_path / "ray"))


def test_ray_runs_in_its_high_throughput_mode_unless_the_environment_says_otherwise(fake_haproxy, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", raising=False)
    monkeypatch.delenv("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", raising=False)
    environment = node_environment("haproxy", str(tmp_path / "ray"))
    assert environment["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # but handles keep their own loop: they work from plain (not async) code
    assert environment["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] == "1"
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")
    assert node_environment("haproxy", str(tmp_path / "ray2"))["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in node_environment("python", str(tmp_path / "ray3"))


def test_the_replicas_are_not_niced_below_haproxy_and_the_clients(fake_haproxy, tmp_path, monkeypatch):
    """Ray starts its workers at nice 15: the replica running the model got 36 parts of the cores
    to HAProxy's 1024 (and every client's) whenever they wanted them. A value set is kept."""
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    assert node_environment("haproxy", str(tmp_path / "ray"))["RAY_worker_niceness"] == "0"
    assert node_environment("python", str(tmp_path / "ray"))["RAY_worker_niceness"] == "0"
    monkeypatch.setenv("RAY_worker_niceness", "5")
    assert node_environment("haproxy", str(tmp_path / "ray"))["RAY_worker_niceness"] == "5"


def test_haproxy_gets_one_thread_per_four_cores_at_most_rays_four_unless_the_environment_says(fake_haproxy,
                                                                                                tmp_path, monkeypatch):
    from handlers.servers.ray_cluster import haproxy_threads

    assert [haproxy_threads(cores) for cores in (1, 2, 7, 8, 12, 16, 64)] == [1, 1, 1, 2, 3, 4, 4]
    monkeypatch.delenv("RAY_SERVE_HAPROXY_NBTHREAD", raising=False)
    assert node_environment("haproxy", str(tmp_path / "ray"))["RAY_SERVE_HAPROXY_NBTHREAD"] == str(haproxy_threads())
    monkeypatch.setenv("RAY_SERVE_HAPROXY_NBTHREAD", "8")
    assert node_environment("haproxy", str(tmp_path / "ray2"))["RAY_SERVE_HAPROXY_NBTHREAD"] == "8"
