"""Issue 29: the seams where one request still failed its batch, or was answered unlike on the
other server. Each test is named after the bug it pins."""

import json
import threading
import time

import pytest
import requests as http
import torch

from handlers import BadRequest, MicroBatchHandler
from handlers.core.request import NO_BODY, TIMEOUT_HEADER, Request, decoded_body, deadline_of
from handlers.engine.errors import RequestError
from handlers.engine.outcome import Success
from handlers.servers.ray_serve import request_from_http
from handlers.testing import FakeContext, LocalServer

from .models import affine_model


class ClientClosedRequest(RequestError):
    status = 499
    kind = "ClientClosedRequest"


class NotAnError(RequestError):
    status = 200
    kind = "NotAnError"


class SeamHandler(MicroBatchHandler):
    """The affine model; a request {"raise": name} raises that error from preprocess_one,
    {"big": n} is answered with n bytes, {"wait_s": s} is preprocessed in s seconds."""

    def load_model(self, model_dir, device):
        return affine_model()

    def preprocess_one(self, request):
        payload = request.json()
        if payload.get("wait_s"):  # past a tiny request_budget_s
            threading.Event().wait(payload["wait_s"])
        if payload.get("raise") == "499":
            raise ClientClosedRequest("the client went away")
        if payload.get("raise") == "200":
            raise NotAnError("fine, really")
        if payload.get("raise") == "not_a_string":
            try:
                int("x")
            except ValueError as exc:
                raise BadRequest(exc)
        return {"x": torch.tensor(payload["x"], dtype=torch.float32), "big": payload.get("big", 0)}

    def collate(self, items):
        return super().collate([item["x"] for item in items])

    def postprocess_one(self, output, item):
        return "a" * item["big"] if item["big"] else output.tolist()


GOOD = {"x": [1, 2, 3, 4]}
ANSWER = [3.0, 5.0, 7.0, 9.0]


@pytest.fixture
def server():
    with LocalServer.start(SeamHandler, handler_config={"micro_batch_size": 3, "pool_size": 2}) as started:
        yield started


@pytest.fixture
def handler(server):
    return server.handler


def ts_batch(handler, bodies):
    """The bodies as one TorchServe batch: (statuses with phrases, bodies as clients read them)."""
    context = FakeContext.for_batch(len(bodies), {"Content-Type": "application/json"})
    sent = handler.handle([{"body": json.dumps(b).encode()} for b in bodies], context)
    return [context.get_response_status(i) for i in range(len(bodies))], [json.loads(b) for b in sent], context


def test_a_hook_error_with_a_status_http_does_not_name_fails_only_its_request_on_torchserve(handler):
    statuses, bodies, _ = ts_batch(handler, [GOOD, {"raise": "499"}, GOOD])
    assert statuses == [(200, None), (499, "Client Error"), (200, None)]
    assert bodies[0] == bodies[2] == ANSWER
    assert bodies[1] == {"code": 499, "type": "ClientClosedRequest", "message": "the client went away"}


def test_a_hook_error_whose_status_is_not_an_http_error_is_a_500_for_its_request_alone(server):
    responses = server.send([GOOD, {"raise": "200"}, GOOD])
    assert [r.status for r in responses] == [200, 500, 200]
    assert "NotAnError.status is 200" in responses[1].body["message"] and "400..599" in responses[1].body["message"]


def test_a_request_error_whose_message_is_not_a_string_fails_only_its_request(handler):
    statuses, bodies, _ = ts_batch(handler, [GOOD, {"raise": "not_a_string"}, GOOD])
    assert [s for s, _ in statuses] == [200, 400, 200]
    assert bodies[1] == {"code": 400, "type": "BadRequest",
                         "message": "invalid literal for int() with base 10: 'x'"}
    assert BadRequest(ValueError("v")).message == "v"


def test_an_error_body_that_cannot_be_built_is_a_500_for_its_request_alone():
    from handlers.core.responses import error_answer

    class Broken(RequestError):
        status = 400

        def to_json(self):
            return {"code": 400, "message": object()}

    answer = error_answer(Broken("x"))
    assert answer.status == 500 and json.loads(answer.encoded.payload)["type"] == "InternalServerError"


def test_a_request_dropped_on_the_servers_budget_is_a_503_with_retry_after_not_a_408():
    now = time.monotonic()
    dropped = Request(b"", deadline=deadline_of({}, now - 3, budget_s=2.0)).abandoned()
    assert dropped.status == 503 and dropped.headers == {"Retry-After": "1"}
    assert "request_budget_s (2 s)" in dropped.message
    gone = Request(b"", deadline=deadline_of({TIMEOUT_HEADER: "1"}, now - 3, budget_s=2.0)).abandoned()
    assert gone.status == 408 and TIMEOUT_HEADER in gone.message


def test_the_503_of_a_dropped_request_carries_retry_after_on_torchserve():
    server = LocalServer.start(SeamHandler, handler_config={"request_budget_s": 0.001})
    try:
        context = FakeContext.for_batch(1)
        server.handler.handle([{"body": b'{"x": [1, 2, 3, 4], "wait_s": 0.05}'}], context)
        assert context.get_response_status(0) == (503, "Service Unavailable")
        assert context.get_response_headers(0)["Retry-After"] == "1"
    finally:
        server.close()


@pytest.mark.parametrize("name", ["content-type", "Content-Type", "CONTENT-TYPE"])
def test_header_names_are_read_without_regard_to_case_on_both_servers(name):
    on_ray = request_from_http(b"{}", {"content-type": "application/json"})
    on_torchserve = Request(b"{}", {"Content-Type": "application/json"})
    for request in (on_ray, on_torchserve):
        assert request.headers[name] == request.headers.get(name) == "application/json"
        assert name in request.headers
    assert list(on_torchserve.headers) == ["Content-Type"]  # names kept as sent


def test_a_declared_charset_decodes_the_body():
    assert decoded_body("café".encode("latin-1"), "text/plain; charset=latin-1") == "café"
    assert decoded_body('{"w": "café"}'.encode("latin-1"), 'application/json; charset="ISO-8859-1"') == {"w": "café"}
    assert decoded_body("café".encode(), "text/plain") == "café"
    with pytest.raises(RequestError) as refused:
        decoded_body(b"abc", "text/plain; charset=no-such-charset")
    assert refused.value.status == 415 and "no-such-charset" in refused.value.message


@pytest.mark.parametrize("body, words", [(b'{"x": [NaN, 1]}', "NaN is not a JSON number"),
                                         (b'{"x": [1e400, 1]}', "1e400 is out of range"),
                                         (b'[-Infinity, 1, 2, 3]', "-Infinity is not a JSON number")])
def test_json_with_nan_infinity_or_overflowing_numbers_is_a_400_naming_it(server, body, words):
    responses = server.send([body, b'{"x": [1, 2, 3, 4]}'], [{"Content-Type": "application/json"}] * 2)
    assert [r.status for r in responses] == [400, 200]
    assert words in responses[0].body["message"]


def multipart(fields):
    prepared = http.Request("POST", "http://x", files=fields).prepare()
    return prepared.body, {"content-type": prepared.headers["Content-Type"]}


def test_a_multipart_form_on_ray_is_read_as_torchserve_reads_it():
    image = bytes(range(256)) * 4 + b"\r\n--\r\n"
    body, headers = multipart({"data": ("cat.jpg", image, "image/jpeg")})
    assert request_from_http(body, headers).body == image
    body, headers = multipart({"body": (None, b"[1, 2, 3, 4]")})
    assert request_from_http(body, headers).body == b"[1, 2, 3, 4]"
    body, headers = multipart({"file": ("cat.jpg", image, "image/jpeg")})
    assert request_from_http(body, headers).body is NO_BODY  # TorchServe reads body or data only
    assert request_from_http(b"garbage", {"content-type": "multipart/form-data"}).body is NO_BODY


def report_of(responses):
    from handlers.engine.batch_engine import BatchReport

    return BatchReport([Success(r) for r in responses], [len(responses)])


def test_an_answer_over_torchserves_max_response_size_fails_alone_and_counts_as_an_error(handler):
    limit = 4096
    handler._max_response_size = limit
    context = FakeContext.for_batch(3, {"Content-Type": "application/json"})
    bodies = [GOOD, {"x": [1, 2, 3, 4], "big": limit}, GOOD]
    sent = handler.handle([{"body": json.dumps(b).encode()} for b in bodies], context)
    assert context.statuses() == [200, 500, 200]
    error = json.loads(sent[1])
    assert error["type"] == "ResponseTooLarge" and f"{limit:,}" in error["message"]
    assert "max_response_size" in error["message"] and "config.properties" in error["message"]
    assert json.loads(sent[0]) == json.loads(sent[2]) == ANSWER
    errors = context.metrics.named("RequestErrors")
    assert [(m.value, m.dimensions["StatusCode"]) for m in errors] == [(1, "500")]


def test_an_answer_just_within_the_limit_and_its_headroom_is_sent():
    from handlers.core.handler import Response
    from handlers.servers.torchserve import RESPONSE_SIZE_HEADROOM, refuse_oversized

    limit = 2048
    fits = Response(200, "a", payload=b"a" * (limit - RESPONSE_SIZE_HEADROOM))
    over = Response(200, "a", payload=b"a" * (limit - RESPONSE_SIZE_HEADROOM + 1))
    responses, report = refuse_oversized([fits, over], report_of([fits, over]), limit)
    assert [r.status for r in responses] == [200, 500]
    assert [o.ok for o in report.outcomes] == [True, False]


def test_torchserves_max_response_size_is_read_where_the_frontend_reads_it(tmp_path):
    from handlers.servers.torchserve import DEFAULT_MAX_RESPONSE_SIZE, max_response_size

    config = tmp_path / "config.properties"
    config.write_text("# comment\nmax_response_size=16777216\n")
    assert max_response_size({"TS_CONFIG_FILE": str(config)})[0] == 16777216
    # The frontend reads the variable only when the file allows it.
    assert max_response_size({"TS_CONFIG_FILE": str(config), "TS_MAX_RESPONSE_SIZE": "100"})[0] == 16777216
    config.write_text("enable_envvars_config=true\nmax_response_size=16777216\n")
    assert max_response_size({"TS_CONFIG_FILE": str(config), "TS_MAX_RESPONSE_SIZE": "100"})[0] == 100
    config.write_text("inference_address=http://127.0.0.1:8080\n")
    assert max_response_size({"TS_CONFIG_FILE": str(config)})[0] == DEFAULT_MAX_RESPONSE_SIZE
    assert max_response_size({})[0] == DEFAULT_MAX_RESPONSE_SIZE  # this test's parent is no frontend
