"""Issue 29 on a real TorchServe (the ``faults`` model, tests/integration/fault_handler.py): a
hook's odd status, a non-string message and an answer over max_response_size each fail their own
request only; the worker lives and the batch-mates get their answers."""

import pytest

from .helpers import concurrently, post_json, worker_pids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]  # the session builds and starts TorchServe

MAX_RESPONSE_SIZE = 16 * 1024 * 1024  # config.properties


def batch_with(torchserve, odd: dict):
    """Six good requests and one ``odd`` one, released together (one batch of the faults model)."""
    def call(i):
        body = {"id": i, "x": [1, 2, 3, 4], **(odd if i == 3 else {})}
        return post_json(torchserve, "faults", body, timeout=60)

    return concurrently(7, call)


def assert_only_the_odd_one_failed(responses, status):
    assert [r.status_code for r in responses] == [200, 200, 200, status, 200, 200, 200], [r.text[:200] for r in responses]
    assert [r.json()["id"] for i, r in enumerate(responses) if i != 3] == [0, 1, 2, 4, 5, 6]
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1  # it had batch-mates


def test_a_hook_status_http_does_not_name_fails_only_its_request_on_torchserve(torchserve):
    pids = worker_pids(torchserve, "faults")
    responses = batch_with(torchserve, {"fault": "status_499"})
    assert_only_the_odd_one_failed(responses, 499)
    assert responses[3].json() == {"code": 499, "type": "ClientClosedRequest", "message": "the client went away"}
    assert worker_pids(torchserve, "faults") == pids


def test_a_request_error_with_a_non_string_message_fails_only_its_request_on_torchserve(torchserve):
    responses = batch_with(torchserve, {"fault": "message_not_a_string"})
    assert_only_the_odd_one_failed(responses, 400)
    assert responses[3].json()["message"] == "invalid literal for int() with base 10: 'x'"


def test_an_answer_over_max_response_size_fails_alone_and_the_worker_lives(torchserve):
    pids = worker_pids(torchserve, "faults")
    responses = batch_with(torchserve, {"answer_bytes": MAX_RESPONSE_SIZE + 1})
    assert_only_the_odd_one_failed(responses, 500)
    error = responses[3].json()
    assert error["type"] == "ResponseTooLarge" and "max_response_size" in error["message"], error
    assert f"{MAX_RESPONSE_SIZE:,}" in error["message"]  # the limit was read from config.properties
    assert worker_pids(torchserve, "faults") == pids


def test_an_answer_under_max_response_size_but_over_torchserves_default_is_sent(torchserve):
    """The worker learned config.properties' 16 MiB, not TorchServe's default 6553500."""
    response = post_json(torchserve, "faults", {"id": 0, "x": [1, 2, 3, 4], "answer_bytes": 10 * 1024 * 1024})
    assert response.status_code == 200 and len(response.content) == 10 * 1024 * 1024
