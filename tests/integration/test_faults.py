"""Injected faults on a real TorchServe (tests/integration/fault_handler.py): only the requests
that must fail fail, with a clear 5xx; the worker keeps serving and is restarted only when its
model is stuck."""

import time

import pytest

from .helpers import background_load, concurrently, post_json, worker_pids

pytestmark = pytest.mark.integration


def test_poison_slow_and_out_of_memory_in_one_batch_fail_only_where_they_must(torchserve):
    pids_before = worker_pids(torchserve, "faults")
    faults = {2: "poison", 5: "slow"}

    def call(i):
        body = {"id": f"r{i}", "x": [i, i, i, i]}
        if i in faults:
            body["fault"] = faults[i]
        return post_json(torchserve, "faults", body)

    responses = concurrently(8, call)
    for i, response in enumerate(responses):
        if faults.get(i) == "poison":
            assert response.status_code == 500
            assert response.json()["type"] == "InferenceFailed"
            assert "poison value" in response.json()["message"]
        elif faults.get(i) == "slow":
            assert response.status_code == 504
            assert response.json()["type"] == "DeadlineExceeded"
        else:  # every micro-batch over 2 ran out of memory: split, retried, answered
            assert response.status_code == 200, response.text
            assert response.json() == {"id": f"r{i}", "y": [2.0 * i + 1] * 4, "sum": 4 * (2.0 * i + 1)}
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 2

    # The worker goes on serving, the same process, and remembers the size that fits.
    after = concurrently(6, lambda i: post_json(torchserve, "faults", {"id": f"later{i}", "x": [1, 1, 1, 1]}))
    assert [r.status_code for r in after] == [200] * 6
    assert worker_pids(torchserve, "faults") == pids_before
    model_log = (torchserve.workdir / "logs" / "model_log.log").read_text()
    assert "micro-batches are capped at 2 from now on" in model_log
    # The poison request's 500 is logged once, at ERROR (filed at WARN: TorchServe files a worker's
    # stderr so), named by the id its client got back, with the traceback.
    poisoned = responses[2].headers["X-Request-Id"]
    [logged] = [line for line in model_log.splitlines() if f"request {poisoned} " in line]
    assert "[WARN ]" in logged and "MODEL_LOG - ERROR handlers.engine.batch_engine: request " in logged, logged
    assert "500 InferenceFailed" in logged
    assert "RuntimeError: the model cannot handle the poison value" in model_log


def test_structured_outputs_served_in_micro_batches_of_two_each_get_their_own_answer(torchserve):
    """Regression: a model answering a tuple (y, sums) went through list(output); with a
    micro-batch of 2 each request got a 200 holding parts of both requests' results."""
    responses = concurrently(4, lambda i: post_json(torchserve, "faults", {"id": f"s{i}", "x": [i, 0, 0, 0]}))
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("application/json")
        expected = [2.0 * i + 1, 1.0, 1.0, 1.0]
        assert response.json() == {"id": f"s{i}", "y": expected, "sum": sum(expected)}


def test_a_model_call_hung_past_the_deadline_answers_its_batch_then_the_worker_is_replaced(torchserve):
    """Regression: a model call hung past the deadline made every later batch answer 504, forever.
    Now the worker answers that batch (504 for what the stuck model holds), ends itself when the
    next batch arrives (TorchServe answers that one "Worker died."), and TorchServe starts a fresh
    worker that answers again. Clients sending all along lose nothing: each gets an answer (200,
    or an error while the worker is replaced), none hangs."""
    pids_before = worker_pids(torchserve, "faults")

    def send(k, i):
        return post_json(torchserve, "faults", {"id": f"bg{k}-{i}", "x": [k, k, k, k]}, timeout=45)

    with background_load(4, send, join_timeout=60) as background:
        hung = post_json(torchserve, "faults", {"id": "stuck", "x": [1, 1, 1, 1], "fault": "hang_model"})
        assert hung.status_code == 504, hung.text
        assert hung.json()["type"] == "DeadlineExceeded"
        answered_at = time.monotonic()
        recovered = None
        while time.monotonic() - answered_at < 120:
            response = post_json(torchserve, "faults", {"id": "after", "x": [2, 2, 2, 2]})
            if response.status_code == 200:
                recovered = time.monotonic() - answered_at
                break
            time.sleep(0.1)  # an error while no worker is registered: ask again shortly
        assert recovered is not None, "no answer within 120 s of the stuck batch"
        assert response.json() == {"id": "after", "y": [5.0] * 4, "sum": 20.0}
    lost = [entry for entry in background if isinstance(entry[2], Exception)]
    assert not lost, lost[:3]
    for _, _, response, k, i in background:
        assert response.status_code in (200, 500, 503, 504), (response.status_code, response.text)
        if response.status_code == 200:  # never another request's answer
            assert response.json() == {"id": f"bg{k}-{i}", "y": [2.0 * k + 1] * 4, "sum": 4 * (2.0 * k + 1)}
    pids_after = worker_pids(torchserve, "faults")
    assert pids_after and set(pids_after).isdisjoint(pids_before), (pids_before, pids_after)
    statuses = sorted({str(entry[2].status_code) for entry in background})
    print(f"\nworker replaced: requests succeed again {recovered:.2f} s after the stuck batch was answered; "
          f"{len(background)} background requests, statuses {statuses}, 0 lost")
    model_log = (torchserve.workdir / "logs" / "model_log.log").read_text()
    assert "ending this worker so that TorchServe starts a fresh one" in model_log


def test_a_sticky_accelerator_error_fails_its_micro_batch_at_once_then_the_worker_is_replaced(torchserve):
    """Regression: a device-side assert (one client's out-of-range index) left the CUDA context
    broken; every later request was a 500 (each micro-batch split to singles) while the worker
    reported itself healthy, so it was never replaced. Now the micro-batch that hit it gets its
    500 without retries, the worker reports itself unhealthy and ends itself when the next batch
    arrives, and TorchServe starts a fresh one."""
    pids_before = worker_pids(torchserve, "faults")
    broken = post_json(torchserve, "faults", {"id": "assert", "x": [1, 1, 1, 1], "fault": "device_assert"})
    assert broken.status_code == 500, broken.text
    assert "the accelerator failed on this micro-batch" in broken.json()["message"]
    answered_at = time.monotonic()
    recovered, statuses = None, []
    while time.monotonic() - answered_at < 120:
        response = post_json(torchserve, "faults", {"id": "after", "x": [2, 2, 2, 2]})
        statuses.append(response.status_code)
        if response.status_code == 200:
            recovered = time.monotonic() - answered_at
            break
        time.sleep(0.1)  # the dying worker's batch, or no worker registered yet: ask again
    assert recovered is not None, f"no answer within 120 s of the broken accelerator: {sorted(set(statuses))}"
    assert response.json() == {"id": "after", "y": [5.0] * 4, "sum": 20.0}
    assert set(statuses[:-1]) <= {500, 503}, statuses
    pids_after = worker_pids(torchserve, "faults")
    assert pids_after and set(pids_after).isdisjoint(pids_before), (pids_before, pids_after)
    print(f"\nbroken accelerator: worker replaced, requests succeed again {recovered:.2f} s later "
          f"(statuses meanwhile: {statuses[:-1]})")
    model_log = (torchserve.workdir / "logs" / "model_log.log").read_text()
    assert "the accelerator is in an unrecoverable state" in model_log
    assert "ending this worker so that TorchServe starts a fresh one" in model_log


def test_requests_whose_client_stops_waiting_while_the_model_is_busy_get_a_408_and_no_model_time(torchserve):
    """Overload: each model call takes a second, one request per call, and each client waits
    1.5 s (x-request-timeout-seconds). The model runs what it can start in time; the rest are
    answered 408 at once, unstarted, instead of costing a second each for nobody."""
    def call(i):
        return post_json(torchserve, "faults_one_by_one", {"id": f"d{i}", "x": [i, i, i, i], "fault": "slow_model"},
                         headers={"x-request-timeout-seconds": "1.5"})

    started = time.monotonic()
    responses = concurrently(6, call)
    took = time.monotonic() - started
    statuses = [r.status_code for r in responses]
    print(f"\nstatuses {statuses} in {took:.1f} s; batch sizes {[r.headers.get('X-Batch-Size') for r in responses]}")
    assert set(statuses) <= {200, 408} and 200 in statuses and 408 in statuses, statuses
    for i, response in enumerate(responses):
        if response.status_code == 200:
            assert response.json() == {"id": f"d{i}", "y": [-41.0] * 4, "sum": -164.0}
        else:
            assert response.json()["type"] == "RequestTimeout"
            assert "no model time was spent" in response.json()["message"]
    # A batch of six would take six seconds of model time; the shed ones cost none.
    assert statuses.count(200) <= 4
