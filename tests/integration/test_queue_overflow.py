"""A burst past TorchServe's job queue (``job_queue_size`` in config.properties) on the real server.

Regression for the queue size nobody had chosen: past about 116 concurrent requests clients got
503 "no worker" (TorchServe's answer to a full queue) from a default no one had documented.

The quickstart worker is paused (SIGSTOP) for the burst: the model is busy throughout, as under a
real overload, and the outcome is exact instead of depending on how fast the worker drains while
256 threads start on a 2-core machine. While it is paused no request can be answered 200, so a
503 that arrives before it resumes was answered without waiting for any batch: immediately.
"""

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from scripts.torchserve_instance import read_properties

from .helpers import concurrently, post_json, worker_pids

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = "quickstart"
BURST = 256
# TorchServe's answer to a full queue (the same as to a model with no worker at all).
QUEUE_FULL = {"code": 503, "type": "ServiceUnavailableException"}
QUEUE_FULL_WORDS = f'Model "{MODEL}" has no worker to serve inference request'


def describe(server, model):
    status, body = server.get(f"{server.management_url}/models/{model}", api="management")
    assert status == 200, body
    return json.loads(body)[0]


def counters(server):
    """TorchServe's Prometheus samples: {'name{labels}': value}."""
    status, body = server.get(f"{server.metrics_url}/metrics", api=None)
    assert status == 200, body
    return {
        key: float(value)
        for key, value in (line.rsplit(" ", 1) for line in body.decode().splitlines() if line and line[0] != "#")
    }


def arrived_and_refused(server):
    """(requests TorchServe has taken in for MODEL, 5xx answers it has sent), from one reading."""
    samples = counters(server)
    arrived = sum(
        v for k, v in samples.items() if k.startswith("ts_inference_requests_total{") and f'model_name="{MODEL}"' in k
    )
    refused = sum(v for k, v in samples.items() if k.startswith("Requests5XX{"))
    return int(arrived), int(refused)


def wait_until_all_arrived(server, before, count, timeout=60):
    """Wait until TorchServe has taken in ``count`` more requests for MODEL; return how many of them
    it refused. TorchServe counts a request just before it queues or refuses it, so a reading
    counts only once the next one, 50 ms later, is the same."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        arrived, refused = arrived_and_refused(server)
        reading = (arrived - before[0], refused - before[1])
        if reading[0] == count and reading == last:
            return reading[1]
        last = reading
        time.sleep(0.05)  # polling a separate process's metrics: nothing to wait on instead
    raise AssertionError(f"TorchServe took in {last} (arrived, refused) of {count} requests in {timeout} s")


def median_max(values):
    values = sorted(values)
    return f"{values[len(values) // 2]:.3f} s median, {values[-1]:.3f} s slowest"


def test_the_served_queue_size_is_set_on_purpose_and_documented():
    props = read_properties(ROOT / "config.properties")
    assert "job_queue_size" in props, "config.properties must set job_queue_size (TorchServe's default is 100)"
    assert f"job_queue_size={props['job_queue_size']}" in (ROOT / "docs" / "queueing.md").read_text()


@pytest.mark.timeout(180)
def test_a_burst_past_the_job_queue_gets_immediate_503s_and_every_accepted_request_its_own_answer(
    torchserve, unique
):
    queue_size = int(torchserve.properties["job_queue_size"])
    model = describe(torchserve, MODEL)
    batch_size = model["batchSize"]
    assert model["jobQueueStatus"] == {"remainingCapacity": queue_size, "pendingRequests": 0}
    # Held by TorchServe at most: the queue plus the one batch handed to the (paused) worker.
    assert queue_size + batch_size < BURST, "the burst must be larger than what the server can hold"

    ids = [unique() for _ in range(BURST)]
    answered = threading.Condition()
    answered_at = {}
    sent_at = [0.0] * BURST

    def call(i):
        sent_at[i] = time.monotonic()
        try:
            outcome = post_json(torchserve, MODEL, {"id": ids[i], "x": [i, -i, 0.5 * i, 1]}, timeout=60)
        except requests.RequestException as error:  # recorded, not raised: a lost request fails below
            outcome = error
        with answered:
            answered_at[i] = time.monotonic()
            answered.notify_all()
        return outcome

    [pid] = worker_pids(torchserve, MODEL)
    before = arrived_and_refused(torchserve)
    with ThreadPoolExecutor(1) as runner:
        os.kill(pid, signal.SIGSTOP)
        try:
            burst = runner.submit(concurrently, BURST, call)
            refused = wait_until_all_arrived(torchserve, before, BURST)
            queue_while_paused = describe(torchserve, MODEL)["jobQueueStatus"]
            with answered:  # the refused ones' answers are on their way: let them all land
                assert answered.wait_for(lambda: len(answered_at) >= refused, timeout=30), (len(answered_at), refused)
        finally:
            resumed_at = time.monotonic()
            os.kill(pid, signal.SIGCONT)
        outcomes = burst.result(timeout=120)

    # (a) Nothing lost: every request got an HTTP answer, 200 or 503.
    errors = [o for o in outcomes if not isinstance(o, requests.Response)]
    assert not errors, errors[:3]
    statuses = [r.status_code for r in outcomes]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    accepted = [i for i, status in enumerate(statuses) if status == 200]
    overflow = [i for i, status in enumerate(statuses) if status == 503]

    # (b) The queue filled to job_queue_size exactly; TorchServe kept that plus one batch (the first
    # requests to arrive, however many came within maxBatchDelay) and refused the rest with its 503.
    assert queue_while_paused == {"remainingCapacity": 0, "pendingRequests": queue_size}
    assert queue_size + 1 <= len(accepted) <= queue_size + batch_size, (len(accepted), queue_size, batch_size)
    assert len(overflow) == refused == BURST - len(accepted)
    for i in overflow:
        body = outcomes[i].json()
        assert {key: body[key] for key in QUEUE_FULL} == QUEUE_FULL and QUEUE_FULL_WORDS in body["message"], body
    # ... and refused at once: every 503 reached its client while the worker was still paused,
    # before any batch could finish; every 200 came after.
    assert max(answered_at[i] for i in overflow) < resumed_at <= min(answered_at[i] for i in accepted)

    # (c) Each accepted request got its own answer (y = 2x + 1).
    for i in accepted:
        assert outcomes[i].json() == {"id": ids[i], "y": [2 * i + 1, -2 * i + 1, i + 1.0, 3.0]}, i

    # -s shows what was measured: seconds from sending to the answer.
    def waits(group):
        return median_max([answered_at[i] - sent_at[i] for i in group])

    print(f"\n{BURST} requests, job_queue_size {queue_size}, batchSize {batch_size}: {len(accepted)} answered 200 "
          f"in {waits(accepted)}, {len(overflow)} answered 503 in {waits(overflow)}; worker paused for "
          f"{resumed_at - min(sent_at):.3f} s after the first request")

    # (d) The same worker goes on serving, with its queue empty again.
    after = post_json(torchserve, MODEL, {"id": "after", "x": [1, 2, 3, 4]})
    assert after.status_code == 200 and after.json() == {"id": "after", "y": [3.0, 5.0, 7.0, 9.0]}
    assert describe(torchserve, MODEL)["jobQueueStatus"] == {"remainingCapacity": queue_size, "pendingRequests": 0}
    assert worker_pids(torchserve, MODEL) == [pid]
