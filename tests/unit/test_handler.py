"""The TorchServe adapter, driven through the fake context of handlers.testing."""

import json
import threading

import pytest
import torch

from handlers import BadRequest, ConfigError, MicroBatchHandler
from handlers.engine.settings import usable_cores
from handlers.servers.torchserve import BATCH_SIZE_HEADER, device_for
from handlers.testing import (
    FakeContext,
    assert_isolates_bad_request,
    assert_matches_alone,
    run_batch,
    start_handler,
)

from .models import AffineHandler, affine_model


def row(i):
    return [float(i), -float(i), 0.5 * i, 1.0]


def expected(i):
    return [2 * x + 1 for x in row(i)]


@pytest.fixture
def handler_factory():
    started = []

    def start(handler_class=AffineHandler, **handler_config):
        handler = start_handler(handler_class, handler_config=handler_config)
        started.append(handler)
        return handler

    yield start
    for handler in started:
        handler.close()


@pytest.mark.parametrize("batch_size", [1, 2, 7, 64])
@pytest.mark.parametrize("micro_batch_size", [1, 3, 8, "whole"])
def test_responses_are_in_order_and_equal_to_each_request_alone(handler_factory, batch_size, micro_batch_size):
    handler = handler_factory(micro_batch_size=micro_batch_size, pool_size=3)
    bodies = [row(i) for i in range(batch_size)]
    close = lambda a, b: torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    responses = assert_matches_alone(handler, bodies, same=close)
    assert all(close(responses[i], expected(i)) for i in range(batch_size))


def test_json_bytes_and_decoded_json_give_the_same_answer(handler_factory):
    handler = handler_factory()
    responses, context = run_batch(handler, [b"[1, 2, 3, 4]", [1, 2, 3, 4], "[1, 2, 3, 4]"])
    assert responses == [[3.0, 5.0, 7.0, 9.0]] * 3
    assert context.statuses() == [200, 200, 200]


@pytest.mark.parametrize("bad_body, status, words", [
    (b"[1, 2, oops", 400, "not valid JSON"),
    (b"\xff\xfe\x00garbage", 400, "not valid JSON"),
    ([["a", "b"]], 400, "expected a JSON array of numbers"),
    (None, 400, "expected a JSON array of numbers"),
])
def test_a_malformed_request_gets_its_own_400_in_every_position(handler_factory, bad_body, status, words):
    handler = handler_factory(micro_batch_size=2)
    error = assert_isolates_bad_request(handler, [row(i) for i in range(5)], bad_body, status)
    assert error["code"] == status and error["type"] == "BadRequest"
    assert words in error["message"]


def test_the_error_response_is_json_with_its_status_and_phrase(handler_factory):
    handler = handler_factory()
    context = FakeContext.for_batch(2)
    sent = handler.handle([{"body": b"{"}, {"body": b"[1,1,1,1]"}], context)
    assert all(isinstance(body, bytes) for body in sent)  # encoded on the pool, as they go out
    responses = [json.loads(body) for body in sent]
    assert context.get_response_status(0) == (400, "Bad Request")
    assert context.get_response_content_type(0) == "application/json"
    assert set(responses[0]) == {"code", "type", "message"}
    assert responses[1] == [3.0, 3.0, 3.0, 3.0]


def test_every_response_says_the_size_of_the_batch_it_was_served_in(handler_factory):
    handler = handler_factory(micro_batch_size=2)
    context = FakeContext.for_batch(5)
    handler.handle([{"body": row(i)} for i in range(4)] + [{"body": b"bad"}], context)
    assert [context.get_response_headers(i)[BATCH_SIZE_HEADER] for i in range(5)] == ["5"] * 5


def test_form_data_rows_are_read_like_bodies(handler_factory):
    handler = handler_factory()
    context = FakeContext.for_batch(1)
    assert handler.handle([{"data": b"[0, 0, 0, 0]"}], context) == [b"[1.0, 1.0, 1.0, 1.0]"]


def test_a_form_post_with_no_body_gets_its_own_415_saying_what_to_send(handler_factory):
    """Regression: `curl -d` without a Content-Type reached the hooks as None ("expected a JSON
    array, got NoneType"): the row holds form fields and no body."""
    handler = handler_factory()
    context = FakeContext.for_batch(2)
    responses = [json.loads(body) for body in handler.handle([{'{"x": [1, 2]}': b""}, {"body": b"[0, 0, 0, 0]"}], context)]
    assert context.statuses() == [415, 200]
    assert "curl -d without -H 'Content-Type: ...' sends a form" in responses[0]["message"]


class PoisonHandler(AffineHandler):
    def infer(self, batch):
        if (batch == 13.0).any():
            raise RuntimeError("numerical blow-up on 13")
        return super().infer(batch)


def test_a_poison_request_fails_alone_with_500_and_its_micro_batch_mates_succeed(handler_factory):
    handler = handler_factory(PoisonHandler, micro_batch_size=4)
    bodies = [row(i) for i in range(10, 18)]
    responses, context = run_batch(handler, bodies)
    assert context.statuses() == [200, 200, 200, 500, 200, 200, 200, 200]
    assert responses[3]["type"] == "InferenceFailed"
    assert "numerical blow-up on 13" in responses[3]["message"]
    assert responses[4] == expected(14)


class ModeSpy(AffineHandler):
    def infer(self, batch):
        if not torch.is_inference_mode_enabled():
            raise RuntimeError("infer ran outside inference_mode")
        return super().infer(batch)


def test_inference_runs_under_inference_mode(handler_factory):
    handler = handler_factory(ModeSpy)
    responses, context = run_batch(handler, [row(1)])
    assert context.statuses() == [200] and responses == [expected(1)]


class LabelledHandler(MicroBatchHandler):
    """A custom handler: a few lines, with its own option and per-request hooks."""

    options = {"scale": 1.0}

    def load_model(self, model_dir, device):
        return affine_model()

    def preprocess_one(self, request):
        payload = request.json()
        if not isinstance(payload, dict) or "features" not in payload:
            raise BadRequest('expected {"features": [4 numbers], "id": ...}')
        return {"id": payload.get("id"), "x": torch.tensor(payload["features"], dtype=torch.float32)}

    def collate(self, items):
        return super().collate([item["x"] for item in items])

    def postprocess_one(self, output, item):
        return {"id": item["id"], "y": (self.config["scale"] * output).tolist()}


def test_a_custom_handler_carries_per_request_data_through_to_its_response(handler_factory):
    handler = handler_factory(LabelledHandler, micro_batch_size=3, scale=10.0)
    bodies = [{"id": f"r{i}", "features": row(i)} for i in range(7)]
    responses, _ = run_batch(handler, bodies)
    assert [r["id"] for r in responses] == [f"r{i}" for i in range(7)]
    assert responses[2]["y"] == [10 * v for v in expected(2)]


def test_the_default_handler_loads_the_torchscript_file_of_the_archive(tmp_path):
    torch.jit.script(affine_model()).save(str(tmp_path / "model.pt"))
    handler = start_handler(
        MicroBatchHandler, model_dir=tmp_path, manifest={"model": {"serializedFile": "model.pt"}}
    )
    try:
        responses, _ = run_batch(handler, [row(3), row(4)])
        assert responses == [expected(3), expected(4)]
    finally:
        handler.close()


def test_the_default_handler_loads_an_eager_model_file_and_its_state_dict(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.linear = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return self.linear(x)\n"
    )
    torch.save({"linear." + k: v for k, v in affine_model().state_dict().items()}, tmp_path / "weights.pt")
    handler = start_handler(
        MicroBatchHandler, model_dir=tmp_path,
        manifest={"model": {"modelFile": "net.py", "serializedFile": "weights.pt"}},
    )
    try:
        responses, _ = run_batch(handler, [row(5)])
        assert responses == [expected(5)]
    finally:
        handler.close()


def test_a_model_file_with_two_modules_is_refused_by_name(tmp_path):
    (tmp_path / "two.py").write_text(
        "import torch\nclass A(torch.nn.Module): pass\nclass B(torch.nn.Module): pass\n"
    )
    with pytest.raises(RuntimeError, match=r"exactly one public torch.nn.Module class, found A, B"):
        start_handler(MicroBatchHandler, model_dir=tmp_path, manifest={"model": {"modelFile": "two.py"}})


def test_the_default_handler_without_a_model_says_what_to_do():
    with pytest.raises(RuntimeError, match="override load_model"):
        start_handler(MicroBatchHandler)


def test_a_bad_setting_stops_start_up_with_a_message_naming_it():
    with pytest.raises(ConfigError, match="handler.micro_batch_size must be an integer >= 1"):
        start_handler(AffineHandler, handler_config={"micro_batch_size": 0})


def test_the_model_goes_to_the_cpu_without_a_gpu():
    assert device_for({"gpu_id": None}) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert device_for({"gpu_id": 0}) == torch.device("cpu")
    else:
        assert device_for({"gpu_id": 0}) == torch.device("cuda:0")


def test_handle_before_initialize_is_a_clear_error():
    with pytest.raises(RuntimeError, match="before initialize"):
        AffineHandler().handle([{"body": row(1)}], FakeContext.for_batch(1))


def test_close_leaves_no_thread_behind():
    before = set(threading.enumerate())
    handler = start_handler(AffineHandler, handler_config={"pool_size": 3, "micro_batch_size": 2})
    run_batch(handler, [row(i) for i in range(6)])
    handler.close()
    handler.close()
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == []


def test_a_json_string_already_decoded_by_torchserve_is_not_parsed_again():
    from handlers import Request

    assert Request("just a string", {"Content-Type": "application/json"}).json() == "just a string"
    assert Request('"quoted"', {"content-type": "text/plain"}).json() == "quoted"
    with pytest.raises(BadRequest, match="not valid JSON"):
        Request("just a string", {"Content-Type": "text/plain"}).json()


def test_precision_and_channels_last_apply_on_a_gpu_only_and_bad_values_are_refused():
    from handlers.core.loading import model_dtype, prepare_model

    model = prepare_model(affine_model(), torch.device("cpu"), "bfloat16", channels_last=True)
    assert model_dtype(model) == torch.float32 and not model.training  # the CPU keeps float32
    with pytest.raises(ConfigError, match="handler.precision must be one of float32, float16, bfloat16, got 'fp8'"):
        prepare_model(affine_model(), torch.device("cpu"), "fp8", channels_last=False)
    if torch.cuda.is_available():
        half = prepare_model(affine_model(), torch.device("cuda:0"), "float16", channels_last=False)
        assert model_dtype(half) == torch.float16


def test_micro_batches_on_the_model_at_once_share_the_cores_unless_torch_threads_is_set():
    from handlers.core.handler import shared_threads

    assert shared_threads(2, 2) == 1 and shared_threads(16, 2) == 8 and shared_threads(16, 3) == 5
    assert shared_threads(1, 4) == 1 and shared_threads(8, 1) == 8
    before = torch.get_num_threads()
    try:
        start_handler(AffineHandler, handler_config={"inference_workers": 2}).close()
        assert torch.get_num_threads() == max(1, usable_cores() // 2)
        handler = AffineHandler()
        handler.start(section={"inference_workers": 2}, cpus=6)  # the CPUs a Ray replica reserved
        handler.close()
        assert torch.get_num_threads() == 3
        handler = AffineHandler()
        handler.start(section={}, cpus=5)  # one micro-batch at a time: all the replica's CPUs
        handler.close()
        assert torch.get_num_threads() == 5
        start_handler(AffineHandler, handler_config={"inference_workers": 2, "torch_threads": 2}).close()
        assert torch.get_num_threads() == 2  # set: it wins
    finally:
        torch.set_num_threads(before)


def test_torch_threads_sets_the_workers_cpu_threads_and_refuses_a_negative_count():
    before = torch.get_num_threads()
    try:
        handler = start_handler(AffineHandler, handler_config={"torch_threads": 1})
        handler.close()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match=r"handler.torch_threads must be >= 0 \(0: torch's default\), got -2"):
        start_handler(AffineHandler, handler_config={"torch_threads": -2})
    assert torch.get_num_threads() == before  # the default leaves torch alone
    start_handler(AffineHandler).close()
    assert torch.get_num_threads() == before
