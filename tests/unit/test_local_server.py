"""The test kit's server adapter: the handler core behind the project's own boundary, and the
same answers as through the TorchServe adapter."""

import pytest

from handlers import ConfigError, Response
from handlers.testing import LocalServer, run_batch, start_handler

from .models import AffineHandler


def test_each_request_gets_its_own_response_with_status_content_type_and_batch_size():
    with LocalServer.start(AffineHandler, handler_config={"micro_batch_size": 2, "pool_size": 2}) as server:
        responses = server.send([[1, 1, 1, 1], b"not json", [2, 2, 2, 2]])
    assert [r.status for r in responses] == [200, 400, 200]
    assert responses[0] == Response(200, [3.0] * 4, "application/json", {"X-Batch-Size": "3"})
    assert responses[1].body["type"] == "BadRequest"
    assert responses[2].body == [5.0] * 4


def test_the_local_server_and_the_torchserve_adapter_answer_alike():
    bodies = [[1, 2, 3, 4], [9, 9, 9, 9], b"[1, 2", [0, 0, 0, 0]]
    config = {"micro_batch_size": 3, "pool_size": 2}
    with LocalServer.start(AffineHandler, handler_config=config) as server:
        local = server.send(bodies)
    handler = start_handler(AffineHandler, handler_config=config)
    try:
        served, context = run_batch(handler, bodies)
    finally:
        handler.close()
    assert [r.body for r in local] == served
    assert [r.status for r in local] == context.statuses()


@pytest.mark.parametrize("section, message", [
    ({"precision": "fp8"}, "handler.precision must be one of float32, float16, bfloat16, got 'fp8'"),
    ({"torch_threads": -3}, "handler.torch_threads must be >= 0"),
    ({"micro_batch_strategy": "smart"}, "handler.micro_batch_strategy must be one of"),
])
def test_a_bad_setting_fails_start_up_with_the_key_the_rule_and_the_value(section, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LocalServer.start(AffineHandler, handler_config=section)
