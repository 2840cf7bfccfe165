"""The test kit shipped to users: its checks must catch the bugs they name."""

import pytest
import torch

from handlers.testing import (
    FakeContext,
    FakeMetrics,
    assert_batch_contract,
    assert_isolates_bad_request,
    assert_matches_alone,
    start_handler,
)

from .models import AffineHandler


def test_fake_context_records_status_headers_and_reads_request_headers():
    context = FakeContext.for_batch(2, headers={"Content-Type": "application/json"})
    context.set_response_status(415, "Unsupported Media Type", idx=1)
    context.set_response_header(0, "X-Batch-Size", "2")
    assert context.statuses() == [200, 415]
    assert context.get_response_headers(0) == {"X-Batch-Size": "2"}
    assert context.get_request_header(1, "Content-Type") == "application/json"
    assert context.get_all_request_header(0) == {"Content-Type": "application/json"}
    assert context.system_properties["gpu_id"] is None


def test_fake_metrics_record_what_is_reported():
    metrics = FakeMetrics()
    metrics.add_counter("Errors", 1, dimensions=[])
    metrics.add_time("InferenceMs", 12.5)
    assert [(r.name, r.value, r.unit) for r in metrics.records] == [("Errors", 1, "count"), ("InferenceMs", 12.5, "ms")]
    assert metrics.named("InferenceMs")[0].kind == "GAUGE"


def test_batch_contract_catches_a_missing_response_and_a_bare_error():
    context = FakeContext.for_batch(2)
    with pytest.raises(AssertionError, match="expected a list of 2 responses"):
        assert_batch_contract(["only one"], context, 2)
    context.set_response_status(400, "Bad Request", idx=1)
    with pytest.raises(AssertionError, match="request 1 failed with 400"):
        assert_batch_contract(["fine", "no json body"], context, 2)


class ReversingHandler(AffineHandler):
    """A bug the kit must catch: answers come back in the wrong order."""

    def split(self, output, count):
        return list(reversed(super().split(output, count)))


class SilentHandler(AffineHandler):
    """A bug the kit must catch: bad input is answered with 200 and a made-up result."""

    def preprocess_one(self, request):
        try:
            return super().preprocess_one(request)
        except Exception:
            return torch.zeros(4)


def test_matches_alone_catches_a_handler_that_mixes_up_the_order():
    handler = start_handler(ReversingHandler)
    try:
        with pytest.raises(AssertionError, match="in a batch"):
            assert_matches_alone(handler, [[1, 1, 1, 1], [2, 2, 2, 2]])
    finally:
        handler.close()


def test_isolates_bad_request_catches_a_handler_that_hides_a_bad_request():
    handler = start_handler(SilentHandler)
    try:
        with pytest.raises(AssertionError, match="statuses"):
            assert_isolates_bad_request(handler, [[1, 1, 1, 1], [2, 2, 2, 2]], "bad", 400)
    finally:
        handler.close()


def test_start_handler_loads_the_model_files_it_is_given(tmp_path):
    """Regression: start_handler(MyHandler) with a model file and weights had no way to name them
    and failed with "the archive has no model"."""
    import torch

    from handlers import MicroBatchHandler
    from handlers.testing import run_batch, start_handler

    (tmp_path / "model.py").write_text(
        "import torch\n\nclass Double(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.scale = torch.nn.Parameter(torch.ones(1))\n\n"
        "    def forward(self, x):\n        return self.scale * x\n")
    torch.save({"scale": torch.tensor([2.0])}, tmp_path / "weights.pt")

    class Numbers(MicroBatchHandler):
        def preprocess_one(self, request):
            return torch.tensor(request.json(), dtype=torch.float32)

        def postprocess_one(self, output, item):
            return output.tolist()

    handler = start_handler(Numbers, model_dir=tmp_path, model_file="model.py", serialized_file="weights.pt")
    try:
        responses, context = run_batch(handler, [b"[1, 2]", b"[3, 4]"])
    finally:
        handler.close()
    assert context.statuses() == [200, 200]
    assert responses == [[2.0, 4.0], [6.0, 8.0]]
