"""The batch contract, stated as properties and searched by Hypothesis: over generated batch
sizes, micro-batch sizes and strategies, pool sizes, output structures and failures injected per
request in every stage, each response equals the request's answer alone, or that request's own
designated error. No other outcome.

Profiles (tests/conftest.py): ``ci`` (the default, short) and ``soak`` (long):
``HYPOTHESIS_PROFILE=soak .venv/bin/python -m pytest tests/unit/test_batch_contract_properties.py``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import namedtuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers import BadRequest, BatchEngine, EngineSettings
from handlers.testing import run_batch, start_handler

from .models import AffineHandler

pytestmark = pytest.mark.timeout(600)

# -- the engine alone --------------------------------------------------------------------------

# What may be injected into one request, and the status it must get (200: its own answer).
FAULT_STATUS = {
    None: 200,
    "bad_request": 400,  # preprocessing refuses the input
    "raise_preprocess": 500,  # a bug in preprocessing
    "raise_inference": 500,  # the model raises on any micro-batch holding it
    "oom_alone": 507,  # the model runs out of memory on it, even alone
    "raise_postprocess": 500,
    "hang_preprocess": 504,  # past the deadline
    "hang_postprocess": 504,
}
HANGS = ("hang_preprocess", "hang_postprocess")
QUICK_FAULTS = [f for f in FAULT_STATUS if f not in HANGS]


@dataclasses.dataclass(frozen=True)
class Req:
    value: float
    fault: str | None


def answer(value):
    return {"x": value, "y": 2 * value + 1}


def make_stages(release: threading.Event, fits: int | None):
    def preprocess(request: Req):
        if request.fault == "bad_request":
            raise BadRequest("injected bad input")
        if request.fault == "raise_preprocess":
            raise KeyError("injected preprocessing bug")
        if request.fault == "hang_preprocess":
            release.wait(30)
        return request

    def infer(items):
        if any(item.fault == "raise_inference" for item in items):
            raise RuntimeError("injected model failure")
        if any(item.fault == "oom_alone" for item in items):
            raise MemoryError("CUDA out of memory (injected, this request)")
        if fits is not None and len(items) > fits:
            raise MemoryError(f"CUDA out of memory (injected, micro-batch of {len(items)} > {fits})")
        return [2 * item.value + 1 for item in items]

    def postprocess(output, item: Req):
        if item.fault == "raise_postprocess":
            raise ZeroDivisionError("injected postprocessing bug")
        if item.fault == "hang_postprocess":
            release.wait(30)
        return {"x": item.value, "y": output}

    return preprocess, infer, postprocess


sizing = st.one_of(
    st.tuples(st.just("static"), st.one_of(st.none(), st.integers(1, 64))),
    st.tuples(st.just("dynamic"), st.none()),
    st.tuples(st.just("adaptive"), st.none()),
)


def check_contract(requests, report):
    assert len(report.outcomes) == len(requests)
    for position, (request, outcome) in enumerate(zip(requests, report.outcomes)):
        wanted = FAULT_STATUS[request.fault]
        if wanted == 200:
            assert outcome.ok, f"request {position} ({request}) failed: {outcome.error!r}"
            assert outcome.value == answer(request.value), f"request {position} got {outcome.value!r}"
        else:
            assert not outcome.ok, f"request {position} ({request}) succeeded: {outcome.value!r}"
            assert outcome.error.status == wanted, f"request {position} ({request}): {outcome.error!r}"


def run_engine(requests, strategy, size, pool_size, fits, deadline_s, batches=1):
    release = threading.Event()
    preprocess, infer, postprocess = make_stages(release, fits)
    engine_settings = EngineSettings(
        micro_batch_size=size, micro_batch_strategy=strategy, pool_size=pool_size, deadline_s=deadline_s
    )
    engine = BatchEngine(preprocess, infer, postprocess, engine_settings)
    try:
        return [engine.run(requests) for _ in range(batches)]
    finally:
        release.set()
        assert engine.close(timeout=30)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    faults=st.lists(st.sampled_from(QUICK_FAULTS), min_size=1, max_size=64),
    sizing=sizing,
    pool_size=st.integers(1, 4),
    fits=st.one_of(st.none(), st.integers(1, 16)),
)
def test_each_request_gets_its_answer_alone_or_its_own_error(faults, sizing, pool_size, fits):
    strategy, size = sizing
    requests = [Req(float(i), fault) for i, fault in enumerate(faults)]
    # Two batches: the second runs with what the first taught (sizes, OOM caps, task chunks).
    for report in run_engine(requests, strategy, size, pool_size, fits, deadline_s=30, batches=2):
        check_contract(requests, report)


# Each example waits out a deadline: a sixth of the profile's examples.
@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=settings().max_examples // 6 or 1)
@given(
    data=st.data(),
    size=st.integers(2, 24),
    micro_batch_size=st.one_of(st.none(), st.integers(1, 8)),
    pool_size=st.integers(1, 3),
)
def test_a_hung_stage_costs_only_its_own_request(data, size, micro_batch_size, pool_size):
    faults = [data.draw(st.sampled_from([None, None, None, "bad_request", "raise_postprocess"])) for _ in range(size)]
    for _ in range(data.draw(st.integers(1, 2))):
        faults[data.draw(st.integers(0, size - 1))] = data.draw(st.sampled_from(HANGS))
    requests = [Req(float(i), fault) for i, fault in enumerate(faults)]
    [report] = run_engine(requests, "static", micro_batch_size, pool_size, None, deadline_s=1.2)
    check_contract(requests, report)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=settings().max_examples // 6 or 1)
@given(size=st.integers(1, 16), micro_batch_size=st.integers(1, 8), data=st.data())
def test_a_hung_model_call_answers_earlier_micro_batches_and_then_refuses_at_once(size, micro_batch_size, data):
    """The model is one resource: a call stuck on it holds its micro-batch and those queued
    behind it (504), never hands out a wrong answer, and the engine then refuses work (503)
    until the call returns."""
    stuck_at = data.draw(st.integers(0, size - 1))
    release = threading.Event()

    def infer(items):
        if stuck_at in items:
            release.wait(30)
        return [2 * x + 1 for x in items]

    engine_settings = EngineSettings(micro_batch_size=micro_batch_size, pool_size=2, deadline_s=0.5)
    engine = BatchEngine(float, infer, lambda y, x: {"x": x, "y": y}, engine_settings)
    try:
        report = engine.run(list(range(size)))
        first_stuck = stuck_at - stuck_at % micro_batch_size
        for position, outcome in enumerate(report.outcomes):
            if position < first_stuck:
                assert outcome.ok and outcome.value == answer(float(position))
            else:
                assert not outcome.ok and outcome.error.status == 504
        assert not engine.healthy
        assert {o.error.status for o in engine.run([1, 2]).outcomes} == {503}
    finally:
        release.set()
        assert engine.close(timeout=30)


# -- through the TorchServe adapter (the test kit's context) ------------------------------------

Pair = namedtuple("Pair", "scores extra")


@dataclasses.dataclass
class Box:
    corner: torch.Tensor
    labels: list


def shape_output(y: torch.Tensor, kind: str):
    """The affine model's (N, 4) output in the structure ``kind``, as real models return."""
    if kind == "tensor":
        return y
    if kind == "tuple":
        return y, y[:, 0]
    if kind == "dict":
        return {"scores": y, "first": y[:, :1]}
    if kind == "namedtuple":
        return Pair(y, {"first": y[:, 0]})
    if kind == "dataclass":
        return Box(y[:, :2], [int(v) for v in y[:, 0]])
    if kind == "nested":
        return {"a": (y, [row.sum() for row in y]), "b": {"c": y[:, 3:]}}
    return [{"scores": row} for row in y]  # "list": one entry per item


def expected_output(x: list, kind: str):
    y = [2 * v + 1 for v in x]
    return {
        "tensor": y,
        "tuple": [y, y[0]],
        "dict": {"scores": y, "first": y[:1]},
        "namedtuple": {"scores": y, "extra": {"first": y[0]}},
        "dataclass": {"corner": y[:2], "labels": int(y[0])},
        "nested": {"a": [y, sum(y)], "b": {"c": y[3:]}},
        "list": {"scores": y},
    }[kind]


OUTPUT_KINDS = ["tensor", "tuple", "dict", "namedtuple", "dataclass", "nested", "list"]


class StructuredHandler(AffineHandler):
    """Affine model, generated output structure, and faults picked by the request's first value:
    -1 → not a number list (400), 13 → the model raises (500), 99 → postprocessing raises (500)."""

    options = {"output_kind": "tensor"}

    def infer(self, batch):
        if (batch[:, 0] == 13.0).any():
            raise RuntimeError("injected model failure")
        return shape_output(super().infer(batch), self.config["output_kind"])

    def postprocess_one(self, output, item):
        if float(item[0]) == 99.0:
            raise ZeroDivisionError("injected postprocessing bug")
        return output


def body_for(value: float):
    if value == -1.0:
        return b"[1, 2, oops"
    return [value, 1.0, 2.0, 3.0]


ADAPTER_STATUS = {-1.0: 400, 13.0: 500, 99.0: 500}


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(OUTPUT_KINDS),
    values=st.lists(st.sampled_from([0.0, 1.0, 2.0, 5.0, 7.0, -1.0, 13.0, 99.0]), min_size=1, max_size=32),
    micro_batch_size=st.one_of(st.none(), st.integers(1, 8)),
    pool_size=st.integers(1, 3),
)
def test_through_the_adapter_each_request_gets_its_own_answer_or_error(kind, values, micro_batch_size, pool_size):
    config = {"micro_batch_size": "whole" if micro_batch_size is None else micro_batch_size,
              "pool_size": pool_size, "output_kind": kind}
    handler = start_handler(StructuredHandler, handler_config=config)
    try:
        responses, context = run_batch(handler, [body_for(v) for v in values])
    finally:
        handler.close()
    statuses = context.statuses(len(values))
    for position, value in enumerate(values):
        wanted = ADAPTER_STATUS.get(value, 200)
        assert statuses[position] == wanted, (position, value, responses[position])
        if wanted == 200:
            assert responses[position] == expected_output(body_for(value), kind), (position, value)
        assert context.get_response_content_type(position) == "application/json"
