"""Structured outputs scattered by their structure, strict JSON out with a Content-Type, and
per-instance headers behind a KServe envelope: the regression tests of those findings."""

import dataclasses
import json
from collections import namedtuple

import numpy as np
import pytest
import torch

from handlers.engine.errors import SplitFailed
from handlers.engine.scatter import cut, learn_layout
from handlers.testing import FakeContext, assert_matches_alone, run_batch, start_handler

from .models import AffineHandler

Pair = namedtuple("Pair", "logits boxes")


@dataclasses.dataclass
class Detections:
    logits: torch.Tensor
    extra: dict


def structured(y, kind):
    """The affine model's output (N, 4) in one of the shapes real models return."""
    boxes = y[:, :2] * 10
    if kind == "tuple":
        return y, boxes
    if kind == "dict":
        return {"logits": y, "boxes": boxes}
    if kind == "namedtuple":
        return Pair(y, boxes)
    if kind == "dataclass":
        return Detections(y, {"boxes": boxes, "scores": (y.sum(dim=1),)})
    if kind == "list_of_dicts":  # detection models: one entry per image
        return [{"boxes": row[:2] * 10, "label": int(row[0])} for row in y]
    raise AssertionError(kind)


def expected(x, kind):
    y = [2 * v + 1 for v in x]
    boxes = [10 * v for v in y[:2]]
    return {
        "tuple": [y, boxes],
        "dict": {"logits": y, "boxes": boxes},
        "namedtuple": {"logits": y, "boxes": boxes},
        "dataclass": {"logits": y, "extra": {"boxes": boxes, "scores": [sum(y)]}},
        "list_of_dicts": {"boxes": boxes, "label": int(y[0])},
    }[kind]


def structured_handler(kind):
    class StructuredHandler(AffineHandler):
        def infer(self, batch):
            return structured(super().infer(batch), kind)

        def postprocess_one(self, output, item):
            return output  # tensors inside become lists on the way out

    return StructuredHandler


KINDS = ["tuple", "dict", "namedtuple", "dataclass", "list_of_dicts"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("micro_batch_size", [1, 2, 3])
def test_structured_outputs_give_each_request_its_own_part(kind, micro_batch_size):
    """Regression: list(output) on a tuple or dict handed each request of a micro-batch of 2 a
    piece of both requests' results (a dict model answered with its key names), and other
    sizes got misleading 500s."""
    handler = start_handler(structured_handler(kind), handler_config={"micro_batch_size": micro_batch_size, "pool_size": 2})
    try:
        bodies = [[float(i), 1.0, 2.0, 3.0] for i in range(5)]
        responses = assert_matches_alone(handler, bodies)
        assert responses == [expected(b, kind) for b in bodies]
    finally:
        handler.close()


@pytest.mark.parametrize("output, problem", [
    (lambda n: (torch.zeros(n, 3), torch.zeros(5)), "output[1] has no dimension that follows the micro-batch size"),
    (lambda n: {"logits": torch.zeros(n, 3), "count": 7}, "output['count'] is a int, one value for the whole"),
    (lambda n: [torch.zeros(3)] * 3, "output[0] has no dimension that follows"),
    (lambda n: torch.tensor(1.0), "output has no dimension that follows"),
    (lambda n: torch.zeros(n, n), "has the micro-batch size in dimensions [0, 1]"),
    (lambda n: [torch.zeros(2)] * (n + 1), "neither one entry per request nor a fixed number"),
    (lambda n: {}, "output is an empty mapping"),
])
def test_an_output_that_cannot_be_attributed_is_a_clear_500_naming_split_and_shapes(output, problem):
    with pytest.raises(SplitFailed) as raised:
        learn_layout({2: output(2), 3: output(3)})
    message = raised.value.message
    assert problem in message
    assert "handler.batch_dims" in message and "override split(output, count)" in message
    assert raised.value.status == 500


def test_a_handler_whose_output_cannot_be_split_answers_each_request_alone_not_a_mix_of_answers():
    """Was: 500 SplitFailed for the whole micro-batch (issue 29: refuse only what even a lone
    call cannot attribute). Each request now gets a model call of its own, and its whole output."""

    class ScalarTail(AffineHandler):
        def infer(self, batch):
            return super().infer(batch), 3.0  # a value for the whole micro-batch

        def postprocess_one(self, output, item):
            logits, tail = output
            return {"y": logits.tolist(), "tail": tail}

    handler = start_handler(ScalarTail, handler_config={"micro_batch_size": 2, "pool_size": 2})
    try:
        responses, context = run_batch(handler, [[1, 1, 1, 1], [2, 2, 2, 2]])
        alone = [run_batch(handler, [row])[0][0] for row in ([1, 1, 1, 1], [2, 2, 2, 2])]
    finally:
        handler.close()
    assert context.statuses() == [200, 200]
    assert responses == alone == [{"y": [[3.0] * 4], "tail": 3.0}, {"y": [[5.0] * 4], "tail": 3.0}]


def test_numpy_leaves_are_cut_along_their_first_dimension():
    def output(n):
        return {"a": np.arange(2 * n).reshape(n, 2), "b": [[chr(ord("x") + i)] for i in range(n)]}

    parts = cut(learn_layout({3: output(3), 1: output(1)}), output(3), 3)
    assert [p["a"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [p["b"] for p in parts] == [["x"], ["y"], ["z"]]


def test_a_non_finite_model_output_is_answered_as_strict_json_null_with_a_content_type():
    """Regression: a 200 whose body held a bare NaN, which strict JSON parsers reject; and no
    Content-Type on successful responses."""

    class Overflowing(AffineHandler):
        def infer(self, batch):
            y = super().infer(batch)
            return y * torch.tensor([1.0, float("inf"), float("nan"), -float("inf")])

    handler = start_handler(Overflowing, handler_config={"pool_size": 2})
    try:
        responses, context = run_batch(handler, [[1, 1, 1, 1], "not json"])
    finally:
        handler.close()
    assert responses[0] == [3.0, None, None, None]
    strict = json.dumps(responses[0], allow_nan=False)  # raises on NaN/Infinity
    assert json.loads(strict) == [3.0, None, None, None]
    assert context.get_response_content_type(0) == "application/json"
    assert context.get_response_content_type(1) == "application/json"


def test_text_and_bytes_answers_carry_their_own_content_types():
    class Texty(AffineHandler):
        def postprocess_one(self, output, item):
            return "text answer" if output[0] > 4 else b"\x00\x01"

    handler = start_handler(Texty, handler_config={"pool_size": 2})
    try:
        responses, context = run_batch(handler, [[1, 1, 1, 1], [2, 2, 2, 2]])
    finally:
        handler.close()
    assert responses == [b"\x00\x01", "text answer"]
    assert context.get_response_content_type(0) == "application/octet-stream"
    assert context.get_response_content_type(1) == "text/plain; charset=utf-8"


def test_an_answer_with_no_json_form_fails_alone_with_a_500_that_says_so():
    class Odd(AffineHandler):
        def postprocess_one(self, output, item):
            return {"value": object()} if output[0] > 4 else output

    handler = start_handler(Odd, handler_config={"pool_size": 2})
    try:
        responses, context = run_batch(handler, [[1, 1, 1, 1], [2, 2, 2, 2]])
    finally:
        handler.close()
    assert context.statuses() == [200, 500]
    assert responses[0] == [3.0] * 4
    assert responses[1]["type"] == "PostprocessFailed" and "has no JSON form" in responses[1]["message"]


envelopes = pytest.importorskip("ts.torch_handler.request_envelope.kserve")
from ts.torch_handler.request_envelope.kserve import KServeEnvelope  # noqa: E402


def test_behind_the_kserve_envelope_every_instance_sees_the_request_headers():
    """Regression: only instance 0 saw the request's headers, so two identical instances in one
    request could get different answers ([400, [3.0, ...]])."""

    class HeaderCheck(AffineHandler):
        def preprocess_one(self, request):
            if request.header("X-Tenant") != "a":
                from handlers import BadRequest

                raise BadRequest("X-Tenant header missing")
            return super().preprocess_one(request)

    handler = start_handler(HeaderCheck, handler_config={"pool_size": 2})
    try:
        context = FakeContext.for_batch(1, headers={"X-Tenant": "a"})
        body = json.dumps({"instances": [[1, 1, 1, 1], [1, 1, 1, 1]]}).encode()
        [response] = KServeEnvelope(handler.handle).handle([{"body": body}], context)
    finally:
        handler.close()
    assert response == {"predictions": [[3.0] * 4, [3.0] * 4]}
    assert context.statuses() == [200]
