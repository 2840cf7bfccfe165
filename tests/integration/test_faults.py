"""Injected faults on a real TorchServe (tests/integration/fault_handler.py): only the requests
that must fail fail, with a clear 5xx; the worker keeps serving and is never restarted."""

import pytest

from .helpers import concurrently, post_json, worker_pids

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
            assert response.json() == {"id": f"r{i}", "y": [2.0 * i + 1] * 4}
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 2

    # The worker goes on serving, the same process, and remembers the size that fits.
    after = concurrently(6, lambda i: post_json(torchserve, "faults", {"id": f"later{i}", "x": [1, 1, 1, 1]}))
    assert [r.status_code for r in after] == [200] * 6
    assert worker_pids(torchserve, "faults") == pids_before
    model_log = (torchserve.workdir / "logs" / "model_log.log").read_text()
    assert "micro-batches are capped at 2 from now on" in model_log
