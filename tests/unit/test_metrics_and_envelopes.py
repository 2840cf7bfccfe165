"""What the adapter reports to TorchServe's metrics, and how it behaves behind KServe envelopes."""

import json

import pytest

from handlers import TensorHandler
from handlers.testing import as_client_reads, FakeContext, run_batch, start_handler

from .models import AffineHandler, affine_model


class PoisonHandler(AffineHandler):
    def infer(self, batch):
        if (batch == 13.0).any():
            raise RuntimeError("blow-up")
        return super().infer(batch)


@pytest.fixture
def handler():
    handler = start_handler(PoisonHandler, handler_config={"micro_batch_size": 2, "pool_size": 2})
    yield handler
    handler.close()


def test_each_batch_reports_its_size_model_calls_stage_times_and_errors(handler):
    bodies = [[1, 1, 1, 1], [13, 13, 13, 13], b"not json", [2, 2, 2, 2], [3, 3, 3, 3]]
    _, context = run_batch(handler, bodies)
    metrics = context.metrics
    [batches] = metrics.named("BatchesServed")
    assert batches.value == 1 and batches.dimensions == {"BatchSize": "5"}
    # Micro-batches [0,1], [2,3], [4]; [2] failed preprocessing so [3] runs alone; [0,1] raises,
    # then [0] and [1] run alone: 3 + 1 + 1 model calls, and one probe that learns the output's
    # layout on this fresh handler: [0] twice over, and blank and noise of [0] (derived inputs).
    assert metrics.named("ModelCalls")[0].value == 8
    stages = {m.dimensions["Stage"]: m.value for m in metrics.named("StageTimeMs")}
    assert set(stages) == {"queue", "preprocess", "inference", "postprocess"}
    assert stages["inference"] > 0 and stages["preprocess"] > 0
    errors = {m.dimensions["StatusCode"]: m.value for m in metrics.named("RequestErrors")}
    assert errors == {"400": 1, "500": 1}


def test_a_clean_batch_reports_no_errors(handler):
    _, context = run_batch(handler, [[1, 2, 3, 4]] * 3)
    assert context.metrics.named("RequestErrors") == []
    # Micro-batches of 2 and 1, and once a probe to learn the output's layout: the first half,
    # and blank and noise of the micro-batch (derived inputs: a size set by the data breaks step).
    assert context.metrics.named("ModelCalls")[0].value == 5
    _, context = run_batch(handler, [[1, 2, 3, 4]] * 3)
    assert context.metrics.named("ModelCalls")[0].value == 2


def test_a_broken_metrics_backend_does_not_cost_the_batch_its_answers(handler):
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("metrics down")

    context = FakeContext.for_batch(2)
    context.metrics = Broken()
    responses = handler.handle([{"body": [0, 0, 0, 0]}, {"body": [1, 1, 1, 1]}], context)
    assert [json.loads(body) for body in responses] == [[1.0] * 4, [3.0] * 4]


envelopes = pytest.importorskip("ts.torch_handler.request_envelope.kserve")
from ts.torch_handler.request_envelope.kserve import KServeEnvelope  # noqa: E402
from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope  # noqa: E402


def test_behind_the_kserve_v1_envelope_each_instance_gets_its_answer(handler):
    context = FakeContext.for_batch(1)
    body = json.dumps({"instances": [[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]]}).encode()
    [response] = KServeEnvelope(handler.handle).handle([{"body": body}], context)
    assert response == {"predictions": [[3.0] * 4, [5.0] * 4, [7.0] * 4]}
    assert context.statuses() == [200]
    assert context.get_response_headers(0)["X-Batch-Size"] == "1"


def test_behind_the_kserve_v1_envelope_a_bad_instance_sets_the_status_and_keeps_the_others(handler):
    context = FakeContext.for_batch(1)
    body = json.dumps({"instances": [[1, 1, 1, 1], ["x"], [13, 13, 13, 13]]}).encode()
    [response] = KServeEnvelope(handler.handle).handle([{"body": body}], context)
    predictions = response["predictions"]
    assert predictions[0] == [3.0] * 4
    assert predictions[1]["code"] == 400 and predictions[2]["code"] == 500
    assert context.statuses() == [400]


def test_behind_the_kserve_v2_envelope_each_input_gets_its_output(handler):
    context = FakeContext.for_batch(1, manifest={"model": {"modelName": "affine", "modelVersion": "1.0"}})
    request = {
        "id": "req-1",
        "inputs": [
            {"name": "a", "shape": [4], "datatype": "FP32", "data": [1, 1, 1, 1]},
            {"name": "b", "shape": [2, 2], "datatype": "FP32", "data": [0, 0, 0, 0]},
        ],
    }
    envelope = KServev2Envelope(handler.handle)
    [response] = envelope.handle([{"body": json.dumps(request).encode()}], context)
    assert response["id"] == "req-1" and response["model_name"] == "affine"
    outputs = {o["name"]: o for o in response["outputs"]}
    assert outputs["a"]["data"] == [3.0] * 4
    # "b" arrives reshaped to 2×2; the base handler declares no shape, so the model itself
    # refuses it (500, isolated by retrying alone) and "a" is unharmed.
    assert outputs["b"]["datatype"] == "BYTES" and outputs["b"]["data"][0]["type"] == "InferenceFailed"
    assert context.statuses() == [500]


# -- issue 17, finding 6: behind the KServe v1 envelope an instance is the request body itself ----


class EchoHandler(AffineHandler):
    """Answers each request with its body: what the handler was handed, unchanged."""

    def preprocess_one(self, request):
        return request.body

    def collate(self, items):
        return list(items)

    def infer(self, batch):
        return batch

    def split(self, output, count):
        return list(output)  # one body per request, by construction


class AffineTensorHandler(TensorHandler):
    """The ready-made TensorHandler (``{"inputs": [...]}`` is its documented form) on y = 2x + 1."""

    def load_model(self, model_dir, device):
        return affine_model()


@pytest.fixture
def echo():
    handler = start_handler(EchoHandler, handler_config={"pool_size": 2})
    yield handler
    handler.close()


@pytest.fixture
def tensor_handler():
    handler = start_handler(AffineTensorHandler, handler_config={"shape": [4], "pool_size": 2})
    yield handler
    handler.close()


def kserve_v1(handler, instances, **headers):
    """One KServe v1 request through TorchServe's own envelope: its response and context."""
    context = FakeContext.for_batch(1, headers=headers)
    body = json.dumps({"instances": instances}).encode()
    [response] = KServeEnvelope(handler.handle).handle([{"body": body}], context)
    return response, context


def test_kserve_v1_instance_that_is_a_json_object_is_the_body_not_a_form_post(tensor_handler):
    """Regression: an instance that is a JSON object was taken for a form post (no "body" or
    "data" field) and answered 415."""
    response, context = kserve_v1(tensor_handler, [{"inputs": [1, 1, 1, 1]}, {"inputs": [2, 2, 2, 2]}])
    assert response == {"predictions": [[3.0] * 4, [5.0] * 4]}
    assert context.statuses() == [200]


def test_kserve_v1_single_instance_that_is_a_json_object_is_the_body_not_a_form_post(tensor_handler):
    """Regression: with one instance the rows and the requests are as many, so a length test
    took the instance for TorchServe's row of a form post (415)."""
    response, context = kserve_v1(tensor_handler, [{"inputs": [1, 2, 3, 4]}])
    assert response == {"predictions": [[3.0, 5.0, 7.0, 9.0]]}
    assert context.statuses() == [200]
    assert context.get_response_content_type(0) == "application/json"


SINGLE_INSTANCES = [
    {"inputs": [1, 2, 3, 4]},
    {"body": [1, 2]},  # the names of TorchServe's own row fields are an instance's fields too
    {"data": [1, 2]},
    {"body": None, "data": None},
    {},
    [1, 2, 3, 4],
    [{"data": 1}],
    3.5,
    0,
    "text",
    "",
    None,
]


def test_kserve_v1_single_instance_is_the_body_unchanged_whatever_its_type(echo):
    """Regression: a lone instance was read as TorchServe's raw row: ``{"body": x}`` and
    ``{"data": x}`` were unwrapped to ``x``, ``{}`` and other objects were a 415 form post."""
    answers = {}
    for instance in SINGLE_INSTANCES:
        response, context = kserve_v1(echo, [instance])
        answers[json.dumps(instance)] = (response, context.statuses())
    assert answers == {json.dumps(i): ({"predictions": [i]}, [200]) for i in SINGLE_INSTANCES}


def test_kserve_v1_instance_with_data_and_other_fields_keeps_every_field(echo):
    """Regression: ``{"data": [1, 2], "other": 3}`` was unwrapped to ``[1, 2]``, silently losing
    ``other``."""
    instances = [{"data": [1, 2], "other": 3}, {"data": [4], "other": {"nested": True}}]
    response, context = kserve_v1(echo, instances)
    assert response == {"predictions": instances}
    assert context.statuses() == [200]
    [alone] = instances[:1]
    assert kserve_v1(echo, [alone])[0] == {"predictions": [alone]}


def test_kserve_v1_good_and_bad_object_instances_each_get_their_own_answer(tensor_handler):
    """Regression: every object instance was a 415, the good ones included."""
    response, context = kserve_v1(tensor_handler, [{"inputs": [1, 1, 1, 1]}, {"inputs": ["x", 1, 1, 1]},
                                                   {"inputs": [2, 2, 2, 2]}])
    good, bad, other_good = response["predictions"]
    assert good == [3.0] * 4 and other_good == [5.0] * 4
    assert bad["code"] == 400
    assert context.statuses() == [400]


def test_without_an_envelope_the_same_rows_are_still_torchserve_rows(echo):
    """The fix must not reach requests served without an envelope: one row with no ``body`` or
    ``data`` is a form post (415), ``{"body": x}`` and ``{"data": x}`` are unwrapped."""
    context = FakeContext.for_batch(1)
    [answer] = echo.handle([{"inputs": [1, 2, 3, 4]}], context)
    assert context.statuses() == [415] and json.loads(answer)["code"] == 415
    context = FakeContext.for_batch(3)
    sent = echo.handle([{"body": [1, 2]}, {"data": "x"}, {"body": None}], context)
    assert [as_client_reads(body, context.get_response_content_type(i)) for i, body in enumerate(sent)] == [
        [1, 2], "x", None]
    assert context.statuses() == [200, 200, 200]


def test_behind_the_kserve_v2_envelope_a_single_input_gets_its_output(handler):
    context = FakeContext.for_batch(1, manifest={"model": {"modelName": "affine", "modelVersion": "1.0"}})
    request = {"inputs": [{"name": "a", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    [response] = KServev2Envelope(handler.handle).handle([{"body": json.dumps(request).encode()}], context)
    assert [(o["name"], o["data"]) for o in response["outputs"]] == [("a", [3.0, 5.0, 7.0, 9.0])]
    assert context.statuses() == [200]
