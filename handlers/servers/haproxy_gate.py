"""Refusing in HAProxy what a replica would refuse (issue 30's retry storm). A refusal costs the
replica about 0.5 ms of its event loop (Ray's HTTP path; this project's part is 16-18 µs), about
2,000 a core-second; HAProxy answering it itself made about 16,800. In a storm the replica's
refusals take the CPU its model needs; answered in HAProxy, they never reach it.

How: the replica publishes, through HAProxy's admin socket, one value per model in a map
(:data:`GATE_RULES`): until when it holds (ms since the epoch), the shortest client timeout it
would admit now (ms, from :meth:`Admission.shortest_timeout`), whether it would refuse every
request (its ``request_budget_s`` is already too short), and the numbers of its refusal's
message. HAProxy refuses a request to that model, with the replica's own 503 body and
``Retry-After: 1``, only while the value holds and the request's ``x-request-timeout-seconds``
is shorter; everything else goes to the replica, which still decides. Fail open: a value that
is not refreshed expires (:data:`FRESH_S`), a replica that empties publishes 0 at once, a
reloaded HAProxy starts with an empty map, and a timeout HAProxy cannot read is the replica's.

Only on the private local cluster (``python -m handlers.ray_serve``: its HAProxy wrapper adds
the rules, see ``handlers.servers.ray_cluster``), and only for a model with one replica (the map
holds one value per model).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)

# Set by the local cluster in its processes' environment: the map file its HAProxy's rules read,
# and an admin socket of its own (Ray's, RAY_SERVE_HAPROXY_SOCKET_PATH, is moved by Ray 2.60 into
# a folder named by a hash of the node).
GATE_MAP = "MICROBATCH_HAPROXY_GATE_MAP"
GATE_SOCKET = "MICROBATCH_HAPROXY_GATE_SOCKET"
GATE_SWITCH = "MICROBATCH_HAPROXY_GATE"  # "0" when the local cluster starts: no gate (the replica refuses alone)
# How long a published value holds in HAProxy; refreshed (by the publisher's thread) at half of it
# while it is not 0. A replica killed or replaced is HAProxy's to refuse for no longer.
FRESH_S = 0.5
# A value that refuses more is published at most this often (every request admitted raises it);
# one that refuses less (a batch answered, the replica empty) at once: stale in that direction,
# HAProxy refuses what the replica would admit.
CLOSING_PERIOD_S = 0.02
SOCKET_TIMEOUT_S = 0.2  # the replica's last answer waits on one (HAProxy answers in microseconds)

# The message is the replica's (handlers.engine.admission), the numbers as of the last publish.
_MESSAGE = ("overloaded: %[var(txn.mb_gate),field(4,:)] requests ahead at %[var(txn.mb_gate),field(5,:)] "
            "requests/s would answer this one in about %[var(txn.mb_gate),field(6,:)] s, too late for its "
            "deadline (@LEFT@ s left); refused before any work, send it again later or to another replica")
_RETURN = ("    http-request return status 503 content-type application/json hdr Retry-After 1 "
           "hdr X-Refused-By haproxy lf-string "
           "\"{\\\"code\\\": 503, \\\"type\\\": \\\"ServiceUnavailable\\\", \\\"message\\\": \\\"" + _MESSAGE + "\\\"}\"")
# A refusal answered before its body is in closes the connection (HAProxy 2.8): wait for a body
# that fits HAProxy's buffer (16 KiB as Ray sets it), so that the client's connection carries its
# next request, as after the replica's refusal; a larger one goes on at 16 KiB (and still closes
# it). A wait that runs out is HAProxy's HTML 408 without Retry-After: 50 ms ran out for clients
# starved of CPU in a retry storm (hundreds a second), so the wait is long, and the refusal is
# the replica's 503 as soon as the first 16 KiB or the whole body is in.
_WAIT = "    http-request wait-for-body time 1s at-least 16384"
# Put after Ray's "acl routes" line in HAProxy's config. txn.mb_gate: the model's value (path
# /predictions/<model>/...; "0" when none); txn.mb_left: ms it still holds; txn.mb_ms: the
# client's timeout in ms ("1" -> 1000, "0.25" -> 250; a form HAProxy cannot read is left to the
# replica); txn.mb_short: the shortest admitted timeout less the client's (> 0: refused).
GATE_RULES = "\n".join([
    "    # microbatch-gate (handlers/servers/haproxy_gate.py)",
    "    http-request set-var(txn.mb_gate) path,field(3,/),map(@MAP@,0) if { path_beg /predictions/ }@AUTH@",
    "    http-request set-var(txn.mb_now) date(0,ms) if { var(txn.mb_gate) -m found }",
    "    http-request set-var(txn.mb_left) var(txn.mb_gate),field(1,:),sub(txn.mb_now) if { var(txn.mb_gate) -m found }",
    "    acl mb_fresh var(txn.mb_left) -m int gt 0",
    "    acl mb_all var(txn.mb_gate),field(3,:) -m str 1",
    _WAIT + " if mb_fresh mb_all",
    _RETURN.replace("@LEFT@", "%[var(txn.mb_gate),field(7,:)]") + " if mb_fresh mb_all",
    "    http-request set-var(txn.mb_ms) \"req.hdr(x-request-timeout-seconds),regsub('^([0-9]+)\\$','\\\\1.'),"
    "concat(,,000),regsub('^([0-9]*)[.]([0-9][0-9][0-9]).*\\$','\\\\1\\\\2')\" "
    "if mb_fresh { req.hdr(x-request-timeout-seconds) -m reg '^[0-9]+([.][0-9]*)?$' }",
    "    http-request set-var(txn.mb_short) var(txn.mb_gate),field(2,:),sub(txn.mb_ms) if { var(txn.mb_ms) -m int gt 0 }",
    _WAIT + " if { var(txn.mb_short) -m int gt 0 }",
    _RETURN.replace("@LEFT@", "%[var(txn.mb_ms),div(1000)].%[var(txn.mb_ms),mod(1000),div(10),add(100),concat(,,),bytes(1,2)]")
    + " if { var(txn.mb_short) -m int gt 0 }",
    "",
])


def socket_rule(socket_path: str) -> str:
    """The admin socket line the gate publishes through, put after Ray's in HAProxy's global
    section (this user only)."""
    return f"    stats socket {socket_path} mode 600 level admin\n"


def gate_rules(map_path: str, api_key: Optional[str] = None) -> str:
    """:data:`GATE_RULES` reading ``map_path``; with ``api_key``, only for requests that carry it
    (the others get the replica's 401, not a 503 that says the model exists)."""
    if any(c.isspace() or c in "\"'\\" for c in map_path):
        raise ValueError(f"the gate's map path must have no spaces or quotes, got {map_path!r}")
    auth = f' {{ req.hdr(authorization) -m str "Bearer {api_key}" }}' if api_key else ""
    return GATE_RULES.replace("@MAP@", map_path).replace("@AUTH@", auth)


def gate_value(shortest_timeout_s: float, inside: int, rate: Optional[float], budget_s: float, now: float) -> str:
    """The map's value for a replica whose admission says ``shortest_timeout_s`` (0: admits
    all), ``inside`` requests and ``rate`` requests/s, at ``now`` (``time.time()``):
    ``until_ms:shortest_ms:all:inside:rate:expected_s:budget_s``, or ``0`` (nothing refused).
    The shortest timeout is rounded down: HAProxy refuses only what the replica would."""
    if shortest_timeout_s <= 0 or not rate:
        return "0"
    until_ms = int((now + FRESH_S) * 1000)
    refuse_all = 0 < budget_s < shortest_timeout_s  # every deadline is at most the budget
    return (f"{until_ms}:{math.floor(shortest_timeout_s * 1000)}:{int(refuse_all)}:{inside}:{rate:.3g}:"
            f"{(inside + 1) / rate:.2f}:{budget_s:.2f}")


class GatePublisher:
    """Publishes an :class:`~handlers.engine.admission.Admission`'s gate value for one model to
    HAProxy, from a thread of its own (the replica's event loop only calls :meth:`changed`).
    :meth:`close` publishes 0 and ends the thread."""

    def __init__(self, admission, key: str, socket_path: str, map_path: str, budget_s: float = 0.0,
                 clock=time.time):
        self._admission, self._key, self._socket_path, self._map_path = admission, key, socket_path, map_path
        self._budget_s, self._clock = budget_s, clock
        self._cond = threading.Condition()
        self._dirty = self._closed = False
        self._sent_ms, self._sent_at = 0, -math.inf
        self._send_lock = threading.Lock()  # a value is computed and sent under it: the last sent is the latest
        self.published = 0  # values sent (for tests and operators)
        self._warned = False
        self._thread = threading.Thread(target=self._run, name=f"microbatch-gate-{key}", daemon=True)
        self._thread.start()

    def changed(self) -> None:
        """Admission's state changed (a request admitted or answered, a batch measured). The
        replica's last request answered: 0 is published before this returns, so that the
        answer, sent after, is never followed by a refusal from HAProxy for an idle replica."""
        if self._sent_ms and self._admission.inside == 0:
            with self._send_lock:
                self._publish(self._clock())
            return
        with self._cond:
            self._dirty = True
            self._cond.notify()

    def close(self, timeout_s: float = 2.0) -> None:
        """Publish 0 (HAProxy refuses nothing for this model) and end the thread; idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        pending = False
        while True:
            with self._cond:
                if not (self._dirty or pending or self._closed):
                    self._cond.wait(None if self._sent_ms == 0 else max(0.0, self._sent_at + FRESH_S / 2 - self._clock()))
                if self._closed:
                    break
                self._dirty, pending = False, False
            now = self._clock()
            shortest_ms = math.floor(self._admission.shortest_timeout() * 1000)
            if shortest_ms > self._sent_ms and now - self._sent_at < CLOSING_PERIOD_S:
                with self._cond:  # refuses more: not before the period is out
                    self._cond.wait_for(lambda: self._closed, CLOSING_PERIOD_S - (now - self._sent_at))
                pending = True
                continue
            if shortest_ms == self._sent_ms and (shortest_ms == 0 or now < self._sent_at + FRESH_S / 2):
                continue
            with self._send_lock:
                self._publish(now)
        with self._send_lock:
            self._send("0")

    def _publish(self, now: float) -> None:
        admission = self._admission
        value = gate_value(admission.shortest_timeout(), admission.inside, admission.rate, self._budget_s, now)
        self._sent_ms = int(value.split(":")[1]) if value != "0" else 0
        self._sent_at = now
        self._send(value)

    def _send(self, value: str) -> None:
        try:
            if "not found" in _command(self._socket_path, f"set map {self._map_path} {self._key} {value}"):
                _command(self._socket_path, f"add map {self._map_path} {self._key} {value}")  # a new HAProxy
            self.published += 1
        except OSError as exc:  # HAProxy reloading or gone: its value expires, the replica decides
            if not self._warned:
                self._warned = True
                log.warning("the HAProxy gate for %s could not publish (%s): the replica refuses alone until "
                            "it can", self._key, exc)


def _command(socket_path: str, line: str) -> str:
    """One command on HAProxy's admin socket; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(SOCKET_TIMEOUT_S)
        connection.connect(socket_path)
        connection.sendall(line.encode() + b"\n")
        answer = b""
        while True:
            data = connection.recv(4096)
            if not data:
                return answer.decode(errors="replace")
            answer += data


def gate_for(admission, key: Optional[str], budget_s: float = 0.0) -> Optional[GatePublisher]:
    """A publisher for model ``key`` where the local cluster's HAProxy has the gate (the
    environment names its map and admin socket); None elsewhere, or without ``key`` (a model
    with several replicas: the map holds one value per model)."""
    map_path, socket_path = os.environ.get(GATE_MAP), os.environ.get(GATE_SOCKET)
    if not key or not map_path or not socket_path or any(c.isspace() for c in key):
        return None
    return GatePublisher(admission, key, socket_path, map_path, budget_s)
