"""Recovery paths cost only the guilty request: one regression test per finding, each failing on
the engine as it was before (fresh pool per stuck batch, OOM cap for life, 504 forever)."""

import json
import threading
import time

import pytest

from handlers import EngineSettings
from handlers.engine.batch_engine import BatchEngine
from handlers.engine.batch_engine import MAX_STUCK_PER_THREAD, MIN_STUCK
from handlers.engine.model_call import PROBE_CAPPED_SIZE_EVERY

from .test_engine import affine, as_dict, model_hanging_on_big, parse, preprocess_hanging_on_negative, values


def answers(requests):
    return [{"input": r, "output": 2 * r + 1} for r in requests]


def pool_threads():
    return [t for t in threading.enumerate() if t.name.startswith("microbatch-pool")]


def test_out_of_memory_traced_to_one_request_does_not_cap_later_micro_batches():
    calls = []

    def oom_on_huge(items):
        calls.append(len(items))
        if 666.0 in items:  # this request is too big even alone
            raise MemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return affine(items)

    settings = EngineSettings(micro_batch_size=16, pool_size=2, deadline_s=10)
    with BatchEngine(parse, oom_on_huge, as_dict, settings) as e:
        guilty = [float(i) for i in range(15)] + [666.0]
        first = e.run(guilty)
        assert values(first)[:15] == answers(guilty[:15])
        assert values(first)[15] == 507
        assert e.safe_micro_batch_size is None
        calls.clear()
        clean = e.run([float(i) for i in range(16)])
    assert values(clean) == answers([float(i) for i in range(16)])
    assert calls == [16]  # one model call, not 16 of size 1


def test_a_cap_caused_by_the_size_is_probed_upward_and_lifted_when_memory_allows():
    limit = {"fits": 4}
    sizes = []

    def fits_up_to_limit(items):
        sizes.append(len(items))
        if len(items) > limit["fits"]:
            raise MemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return affine(items)

    requests = [float(i) for i in range(16)]
    settings = EngineSettings(micro_batch_size=16, pool_size=2, deadline_s=10)
    with BatchEngine(parse, fits_up_to_limit, as_dict, settings) as e:
        assert values(e.run(requests)) == answers(requests)
        assert e.safe_micro_batch_size == 4
        limit["fits"] = 16  # memory freed (another model unloaded)
        for _ in range(PROBE_CAPPED_SIZE_EVERY):
            assert values(e.run(requests)) == answers(requests)
        assert e.safe_micro_batch_size is None
        sizes.clear()
        assert values(e.run(requests)) == answers(requests)
    assert sizes == [16]


@pytest.mark.timeout(30)
def test_postprocessing_does_not_wait_behind_a_hung_preprocessing_stage_with_a_pool_of_one():
    release = threading.Event()

    hangs_on_negative = preprocess_hanging_on_negative(release)

    settings = EngineSettings(micro_batch_size=1, pool_size=1, deadline_s=2.0)
    e = BatchEngine(hangs_on_negative, affine, as_dict, settings)
    try:
        report = e.run([2.0, -1.0])
        assert values(report)[0] == {"input": 2.0, "output": 5.0}
        assert values(report)[1] == 504
    finally:
        release.set()
        assert e.close(timeout=10)


@pytest.mark.timeout(30)
def test_requests_sharing_a_pool_task_with_a_hung_one_still_get_their_answers():
    release = threading.Event()

    hangs_on_negative = preprocess_hanging_on_negative(release)

    settings = EngineSettings(pool_size=2, deadline_s=2.0)
    e = BatchEngine(hangs_on_negative, affine, as_dict, settings)
    try:
        for _ in range(3):  # cheap requests: the engine learns to put many in one pool task
            e.run([float(i) for i in range(32)])
        requests = [float(i) for i in range(32)]
        requests[3] = -1.0
        report = e.run(requests)
        got = values(report)
        assert got[3] == 504
        assert got[:3] + got[4:] == answers(requests[:3] + requests[4:])
    finally:
        release.set()
        assert e.close(timeout=10)


@pytest.mark.timeout(60)
def test_hung_stages_cannot_grow_threads_without_bound_and_close_reports_them(caplog):
    release = threading.Event()

    hangs_on_negative = preprocess_hanging_on_negative(release)

    before = set(pool_threads())
    settings = EngineSettings(pool_size=2, deadline_s=0.4)
    e = BatchEngine(hangs_on_negative, affine, as_dict, settings)
    try:
        for _ in range(8):
            e.run([-1.0, -2.0, 1.0])
        assert len(set(pool_threads()) - before) <= settings.pool_size + max(MIN_STUCK, MAX_STUCK_PER_THREAD * settings.pool_size)
        assert e.close(timeout=0.2) is False  # the hung stages still hold threads
        assert "held by hung stages" in caplog.text
    finally:
        release.set()
    assert e.close(timeout=10) is True
    assert set(pool_threads()) - before == set()


@pytest.mark.timeout(30)
def test_a_model_call_hung_past_the_deadline_makes_the_engine_unhealthy_not_504_forever():
    release = threading.Event()

    hangs_on_big = model_hanging_on_big(release)

    settings = EngineSettings(micro_batch_size=2, pool_size=2, deadline_s=0.5)
    e = BatchEngine(parse, hangs_on_big, as_dict, settings)
    try:
        assert values(e.run([1.0, 500.0])) == [504, 504]
        assert e.unhealthy_reason is not None and "model is stuck" in e.unhealthy_reason
        started = time.monotonic()
        later = e.run([1.0, 2.0])
        assert [o.error.status for o in later.outcomes] == [503, 503]  # at once, not after the deadline
        assert time.monotonic() - started < settings.deadline_s
        assert "this worker cannot serve now" in later.outcomes[0].error.message
        release.set()
        for _ in range(100):  # the stuck call returns; the engine serves again
            if e.healthy:
                break
            threading.Event().wait(0.05)
        assert values(e.run([1.0, 2.0])) == answers([1.0, 2.0])
    finally:
        release.set()
        assert e.close(timeout=10)


class BrokenSizing:
    def __init__(self, fail_in):
        self.fail_in = fail_in

    def size_for(self, batch_size):
        if self.fail_in == "size_for":
            raise RuntimeError("sizing bug")
        return 2

    def observe(self, batch_size, preprocess_seconds, calls):
        if self.fail_in == "observe":
            raise RuntimeError("learning bug")


@pytest.mark.parametrize("fail_in", ["size_for", "observe"])
def test_run_never_raises_when_planning_or_the_sizing_update_fails(fail_in):
    with BatchEngine(parse, affine, as_dict, EngineSettings(pool_size=2, deadline_s=5)) as e:
        e._sizing = BrokenSizing(fail_in)
        report = e.run([1.0, 2.0, 3.0])
    if fail_in == "size_for":
        assert [o.error.status for o in report.outcomes] == [500, 500, 500]
        assert "sizing bug" in report.outcomes[0].error.message
    else:
        assert values(report) == answers([1.0, 2.0, 3.0])


def test_every_5xx_is_logged_with_its_traceback_and_4xx_are_not(caplog):
    def fragile(output, item):
        if item == 2.0:
            raise ZeroDivisionError("division by zero in postprocess")
        return output

    with BatchEngine(parse, affine, fragile, EngineSettings(pool_size=2, deadline_s=5)) as e:
        e.run([1.0, 2.0, "not a number"])
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    # The traceback travels as text (no frames kept alive), and is logged with the error.
    assert "Traceback (most recent call last)" in errors[0].getMessage()
    assert "ZeroDivisionError: division by zero in postprocess" in errors[0].getMessage()
    assert "PostprocessFailed" in errors[0].getMessage()
    assert "expected a number" not in caplog.text


class Panic(BaseException):
    """What a Rust extension raises on a panic (pyo3's PanicException derives from BaseException)."""


def test_a_stage_raising_a_base_exception_fails_its_request_alone_not_the_batch():
    def panics_on_two(request):
        if request == 2.0:
            raise Panic("tokenizer panicked")
        return float(request)

    with BatchEngine(panics_on_two, affine, as_dict, EngineSettings(pool_size=2, deadline_s=5)) as e:
        report = e.run([1.0, 2.0, 3.0])
    assert values(report) == [answers([1.0])[0], 500, answers([3.0])[0]]
    assert "Panic" in report.outcomes[1].error.message


@pytest.mark.timeout(30)
def test_a_torchserve_worker_whose_model_is_stuck_ends_itself_when_the_next_batch_arrives(monkeypatch):
    """It answers the stuck batch, then ends the process before answering the next one (so that
    TorchServe fails that batch in flight instead of losing a job it polled between batches)."""
    import handlers.servers.torchserve as adapter
    from handlers.testing import FakeContext, start_handler

    from .models import AffineHandler

    release = threading.Event()

    class Stuck(AffineHandler):
        def infer(self, batch):
            if (batch > 100).any():
                release.wait(30)
            return super().infer(batch)

    exits = []
    monkeypatch.setattr(adapter.os, "_exit", lambda code: exits.append(code) or (_ for _ in ()).throw(SystemExit(code)))
    handler = start_handler(Stuck, handler_config={"pool_size": 2, "deadline_s": 0.5})
    try:
        context = FakeContext.for_batch(2)
        context.cl_socket = object()  # as in a TorchServe worker
        responses = handler.handle([{"body": [1, 1, 1, 1]}, {"body": [500, 1, 1, 1]}], context)
        assert context.statuses() == [504, 504] and json.loads(responses[0])["type"] == "DeadlineExceeded"
        assert exits == []  # the stuck batch is answered first
        with pytest.raises(SystemExit):
            handler.handle([{"body": [2, 2, 2, 2]}], context)
        assert exits == [adapter.WORKER_REPLACED_EXIT_CODE]
    finally:
        release.set()
        handler.close()
