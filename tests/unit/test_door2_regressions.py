"""Regression tests for issue 30 ("The door", part 2): a model that cannot start, and the
answers Ray Serve gives where TorchServe answers itself. Each is named after the bug it pins."""

import asyncio
import json
import logging

from starlette.requests import Request as StarletteRequest

from handlers import MicroBatchHandler
from handlers.servers import ray_serve, torchserve
from handlers.testing import FakeContext

LIMIT = 1024 * 1024
REASON = "weights.pt was saved for 8 features, the model has 4"
LINE = f"microbatch-handlers: model broken cannot start: RuntimeError: {REASON}"

BROKEN_HANDLER_FILE = f'''
from handlers import MicroBatchHandler


class Broken(MicroBatchHandler):
    def load_model(self, model_dir, device):
        raise RuntimeError({REASON!r})
'''


def http_request(path="/predictions/broken", body=b'{"x": [1, 2, 3, 4]}', headers=()):
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    scope = {"type": "http", "method": "POST", "path": path, "headers": raw, "query_string": b""}
    sent = []

    async def receive():
        sent.append(True)
        return {"type": "http.request", "body": body if len(sent) == 1 else b"", "more_body": False}

    return StarletteRequest(scope, receive)


def assert_cannot_start_answer(status, headers, payload):
    assert status == 503
    assert int(headers["Retry-After"]) > 0
    assert json.loads(payload) == {"code": 503, "type": "ModelCannotStart", "message": LINE}


def test_a_ray_replica_whose_model_cannot_start_answers_503_with_the_reason_at_once_and_logs_it_once(
        monkeypatch, caplog):
    """A new user's trial: the replica raised from its constructor, Ray retried it (the reason
    logged at each try) while requests waited until the client gave up (curl: 000 after 20 s)."""
    monkeypatch.setattr(ray_serve, "_device", lambda: "cpu")
    monkeypatch.setattr(ray_serve, "_assigned_cpus", lambda: None)
    monkeypatch.setattr(ray_serve, "_deployment_name", lambda: "broken")
    with caplog.at_level(logging.ERROR, logger="handlers"):
        made = ray_serve.replica_class(1)({"handler.py": BROKEN_HANDLER_FILE.encode()}, "handler.py",
                                          {"batchSize": 4}, {}, LIMIT)
    try:
        made.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.01})  # Ray calls it after __init__
        made.check_health()  # not replaced: a replacement would fail the same way, and log again
        assert made.startup_failure() == LINE
        for _ in range(3):
            answer = asyncio.run(asyncio.wait_for(made(http_request()), 5))
            assert_cannot_start_answer(answer.status_code, answer.headers, answer.body)
        assert [r.getMessage() for r in caplog.records if "cannot start" in r.getMessage()] == [LINE]
    finally:
        made.__del__()


def test_a_ray_replica_that_cannot_start_still_asks_for_the_token_first(monkeypatch):
    monkeypatch.setattr(ray_serve, "_device", lambda: "cpu")
    monkeypatch.setattr(ray_serve, "_assigned_cpus", lambda: None)
    monkeypatch.setattr(ray_serve, "_deployment_name", lambda: "broken")
    made = ray_serve.replica_class(1)({"handler.py": BROKEN_HANDLER_FILE.encode()}, "handler.py",
                                      {"batchSize": 4}, {}, LIMIT, "the-key")
    assert asyncio.run(made(http_request())).status_code == 401
    answer = asyncio.run(made(http_request(headers=[(b"authorization", b"Bearer the-key")])))
    assert_cannot_start_answer(answer.status_code, answer.headers, answer.body)


def test_ray_serves_ping_says_unhealthy_while_a_model_cannot_start_and_names_it_to_key_holders_only():
    """/ping said nothing of a model that could not start (Ray's own health was fine)."""
    assert ray_serve.ping_answer({}) == (200, b'{\n  "status": "Healthy"\n}\n')  # TorchServe's bytes
    status, body = ray_serve.ping_answer({"broken": LINE})
    assert status == 500 and json.loads(body) == {"status": "Unhealthy"}
    status, body = ray_serve.ping_answer({"broken": LINE}, detailed=True)
    assert status == 500 and json.loads(body) == {"status": "Unhealthy", "models": {"broken": LINE}}


class BrokenHandler(MicroBatchHandler):
    def load_model(self, model_dir, device):
        raise RuntimeError(REASON)


def test_a_torchserve_worker_whose_model_cannot_start_answers_503_with_the_reason_instead_of_dying(
        monkeypatch, caplog):
    """The worker raised from initialize: TorchServe restarted it with backoff, logging the
    reason 10 times in 30 s, its requests queued (/ping "Healthy") until the client gave up."""
    monkeypatch.setattr(torchserve, "on_a_worker", lambda context: True, raising=False)  # as on a real worker
    monkeypatch.setattr(torchserve, "log_with_levels", lambda: None)  # keep caplog's records
    context = FakeContext(model_name="broken", request_headers=[{"Content-Type": "application/json"}] * 2)
    handler = BrokenHandler()
    with caplog.at_level(logging.ERROR, logger="handlers"):
        handler.initialize(context)  # did raise, ending the worker
        payloads = handler.handle([{"body": b'{"x": [1]}'}, {"body": b'{"x": [2]}'}], context)
        handler.handle([{"body": b'{"x": [3]}'}], context)
    assert len(payloads) == 2
    for idx, payload in enumerate(payloads):
        assert_cannot_start_answer(context.get_response_status(idx)[0], context.get_response_headers(idx), payload)
        assert context.get_response_content_type(idx) == "application/json"
    assert [r.getMessage() for r in caplog.records if "cannot start" in r.getMessage()] == [LINE]


def test_the_test_kit_still_raises_when_a_model_cannot_start():
    import pytest

    with pytest.raises(RuntimeError, match="8 features"):
        BrokenHandler().initialize(FakeContext(model_name="broken"))


def test_ray_serves_404_for_an_unknown_model_is_torchserves_byte_for_byte():
    """Recorded from TorchServe 0.12: its 404 is JSON indented by two with a final newline; Ray
    Serve's was the same JSON on one line."""
    assert ray_serve.not_found_body("/predictions/nosuch") == (
        b'{\n  "code": 404,\n  "type": "ModelNotFoundException",\n  "message": "Model not found: nosuch"\n}\n')
    assert ray_serve.not_found_body("/nosuch") == (
        b'{\n  "code": 404,\n  "type": "ResourceNotFoundException",\n'
        b'  "message": "Requested resource is not found, please refer to API document."\n}\n')


def test_ray_serves_413_for_a_body_over_the_limit_stays_json_where_torchserves_is_empty():
    """TorchServe 0.12 answers 413 with an empty body (Content-Length: 0, recorded); Ray Serve
    keeps its JSON {code, type, message}, documented in docs/ray_serve.md."""
    body = asyncio.run(ray_serve.read_body(http_request(body=b"x" * (LIMIT + 1)), LIMIT))
    answer = ray_serve._error_response(body)
    assert answer.status_code == 413
    assert json.loads(answer.body)["code"] == 413 and json.loads(answer.body)["type"] == "PayloadTooLarge"
