"""Requests nobody waits for any more: a 408 at once, no model time, batch-mates unaffected.

Under overload clients give up (their timeout, sent as ``x-request-timeout-seconds``, or the
handler's ``request_budget_s``); the model's time must go to requests still awaited.
"""

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers import EngineSettings, MicroBatchHandler
from handlers.core.request import TIMEOUT_HEADER, Request, deadline_of
from handlers.engine.batch_engine import BatchEngine
from handlers.testing import LocalServer


def test_the_deadline_is_the_sooner_of_the_clients_timeout_and_the_budget():
    assert deadline_of({}, 100.0) is None
    assert deadline_of({}, 100.0, budget_s=2.0) == 102.0
    assert deadline_of({TIMEOUT_HEADER: "0.5"}, 100.0) == 100.5
    assert deadline_of({"X-Request-Timeout-Seconds": "5"}, 100.0, budget_s=2.0) == 102.0  # any case
    assert deadline_of({TIMEOUT_HEADER: "1.5"}, 100.0, budget_s=2.0) == 101.5


@pytest.mark.parametrize("sent", ["", "soon", "0", "-1", "nan", "inf"])
def test_a_timeout_header_that_is_not_a_positive_number_is_ignored_as_ray_serves_proxy_ignores_it(sent):
    assert deadline_of({TIMEOUT_HEADER: sent}, 100.0) is None
    assert deadline_of({TIMEOUT_HEADER: sent}, 100.0, budget_s=3.0) == 103.0


def test_a_request_past_its_deadline_or_whose_client_hung_up_is_abandoned_with_a_408():
    now = time.monotonic()
    assert Request(b"", deadline=now + 60).abandoned() is None
    late = Request(b"", deadline=now - 0.25).abandoned()
    assert late.status == 408 and "deadline passed" in late.message and "no model time" in late.message
    hung_up = threading.Event()
    request = Request(b"", deadline=now + 60, hung_up=hung_up)
    assert request.abandoned() is None
    hung_up.set()
    assert "closed the connection" in request.abandoned().message


def recording_engine(micro_batch_size, seen, infer_seconds=0.0, on_model=None):
    def infer(items):
        seen.append([item for item in items])
        if on_model:
            on_model(items)
        time.sleep(infer_seconds)
        return [2 * x for x in items]

    return BatchEngine(lambda request: float(request.body), infer, lambda output, item: output,
                       EngineSettings(micro_batch_size=micro_batch_size, pool_size=2, deadline_s=30),
                       abandoned=lambda request: request.abandoned())


def test_an_abandoned_request_is_never_preprocessed_nor_run_and_its_batch_mates_get_their_answers():
    seen, preprocessed = [], []
    now = time.monotonic()

    def preprocess(request):
        preprocessed.append(request.body)
        return float(request.body)

    engine = BatchEngine(preprocess, lambda items: (seen.append(list(items)), [2 * x for x in items])[1],
                         lambda output, item: output, EngineSettings(micro_batch_size=2, pool_size=2),
                         abandoned=lambda request: request.abandoned())
    with engine:
        report = engine.run([Request(1), Request(2, deadline=now - 1), Request(3, deadline=now + 60), Request(4)])
    answers = [o.value if o.ok else o.error.status for o in report.outcomes]
    assert answers == [2.0, 408, 6.0, 8.0]
    assert 2 not in preprocessed
    assert sorted(x for batch in seen for x in batch) == [1.0, 3.0, 4.0]
    assert report.micro_batch_sizes == [2, 1]  # cut from the three still awaited


def test_a_request_given_up_while_earlier_micro_batches_run_never_reaches_the_model():
    seen = []
    hung_up = [threading.Event() for _ in range(6)]
    # The client of request 5 hangs up while the model runs the first micro-batch.
    engine = recording_engine(2, seen, on_model=lambda items: hung_up[5].set() if 0.0 in items else None)
    with engine:
        report = engine.run([Request(i, hung_up=hung_up[i]) for i in range(6)])
    answers = [o.value if o.ok else o.error.status for o in report.outcomes]
    assert answers == [0.0, 2.0, 4.0, 6.0, 8.0, 408]
    assert seen == [[0.0, 1.0], [2.0, 3.0], [4.0]]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["awaited", "late", "hangs up while queued"]), min_size=1, max_size=12),
    st.integers(min_value=1, max_value=5),
)
def test_each_request_gets_its_own_answer_or_a_408_only_when_abandoned_and_the_model_sees_only_the_awaited(
        fates, micro_batch_size):
    now = time.monotonic()
    hung_up = [threading.Event() for _ in fates]
    first_call = threading.Event()

    def on_model(items):
        if not first_call.is_set():
            first_call.set()
            for position, fate in enumerate(fates):
                if fate == "hangs up while queued":
                    hung_up[position].set()

    requests = [Request(position, deadline=now - 1 if fate == "late" else now + 60, hung_up=hung_up[position])
                for position, fate in enumerate(fates)]
    seen = []
    with recording_engine(micro_batch_size, seen, on_model=on_model) as engine:
        report = engine.run(requests)
    reached_model = {x for batch in seen for x in batch}
    for position, (fate, outcome) in enumerate(zip(fates, report.outcomes)):
        if outcome.ok:
            assert outcome.value == 2.0 * position  # its own answer, never a batch-mate's
            assert fate != "late"
        else:
            assert outcome.error.status == 408 and fate != "awaited"
        if fate == "late":
            assert float(position) not in reached_model
        if fate == "awaited":
            assert outcome.ok
    # A request that hung up while queued reached the model only in the first micro-batch.
    first = set(seen[0]) if seen else set()
    for position, fate in enumerate(fates):
        if fate == "hangs up while queued" and float(position) in reached_model:
            assert float(position) in first


class SlowDoubler(MicroBatchHandler):
    """Doubles its input, 1.5 s per model call; counts the items it ran."""

    ran: list = []

    def load_model(self, model_dir, device):
        ran = self.ran

        class Slow(torch.nn.Module):
            def forward(self, batch):
                ran.extend(batch[:, 0].tolist())
                time.sleep(1.5)
                return 2 * batch

        return Slow()


SLOW = {"micro_batch_size": 1, "pool_size": 2, "batch_dims": {"output": 0}}


@pytest.mark.parametrize("header, budget", [({TIMEOUT_HEADER: "1.0"}, 0.0), ({}, 1.0), ({TIMEOUT_HEADER: "9"}, 1.0)])
def test_through_a_handler_requests_the_model_cannot_reach_in_time_are_shed_unstarted(header, budget):
    SlowDoubler.ran.clear()
    with LocalServer.start(SlowDoubler, handler_config={**SLOW, "request_budget_s": budget}) as server:
        responses = server.send([[float(i)] for i in range(5)], headers=[header] * 5)
    # 1.5 s per micro-batch of one and 1 s to live: only the first starts in time. The client's
    # own timeout passing is a 408; the server's budget passing, a 503 the client may retry.
    status, kind = (408, "RequestTimeout") if budget == 0 else (503, "ServiceUnavailable")
    assert [r.status for r in responses] == [200, status, status, status, status]
    assert responses[0].body == [0.0]
    assert responses[4].body["type"] == kind
    assert SlowDoubler.ran == [0.0]  # no model time on the four nobody waits for


def test_request_budget_s_must_not_be_negative():
    from handlers import ConfigError

    with pytest.raises(ConfigError, match="request_budget_s must be >= 0"):
        LocalServer.start(SlowDoubler, handler_config={**SLOW, "request_budget_s": -1})
