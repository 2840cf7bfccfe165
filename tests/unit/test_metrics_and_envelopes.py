"""What the adapter reports to TorchServe's metrics, and how it behaves behind KServe envelopes."""

import json

import pytest

from handlers.testing import FakeContext, run_batch, start_handler

from .models import AffineHandler


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
    # then [0] and [1] run alone: 3 + 1 + 1 model calls.
    assert metrics.named("ModelCalls")[0].value == 5
    stages = {m.dimensions["Stage"]: m.value for m in metrics.named("StageTimeMs")}
    assert set(stages) == {"queue", "preprocess", "inference", "postprocess"}
    assert stages["inference"] > 0 and stages["preprocess"] > 0
    errors = {m.dimensions["StatusCode"]: m.value for m in metrics.named("RequestErrors")}
    assert errors == {"400": 1, "500": 1}


def test_a_clean_batch_reports_no_errors(handler):
    _, context = run_batch(handler, [[1, 2, 3, 4]] * 3)
    assert context.metrics.named("RequestErrors") == []
    assert context.metrics.named("ModelCalls")[0].value == 2


def test_a_broken_metrics_backend_does_not_cost_the_batch_its_answers(handler):
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("metrics down")

    context = FakeContext.for_batch(2)
    context.metrics = Broken()
    responses = handler.handle([{"body": [0, 0, 0, 0]}, {"body": [1, 1, 1, 1]}], context)
    assert responses == [[1.0] * 4, [3.0] * 4]


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
