"""Issue 29, part 3: one object owns "this worker must be replaced"; the model call, the engine
and the stage pool report to it, and the handler (so each server adapter) asks it."""

import threading
from concurrent.futures import Future

import pytest

from handlers.engine.health import STUCK_MODEL_CALL, WorkerHealth
from handlers.engine.model_call import ModelCall
from handlers.engine.pool import StagePool


def test_a_new_worker_is_healthy():
    health = WorkerHealth()
    assert health.reason is None and not health.must_be_replaced


def test_a_broken_accelerator_is_for_good_and_its_first_reason_is_kept():
    health = WorkerHealth()
    health.accelerator_broken("illegal memory access")
    health.accelerator_broken("a later error")
    assert health.reason == health.accelerator == "illegal memory access" and health.must_be_replaced


def test_a_stuck_model_call_lasts_until_it_returns():
    health, call = WorkerHealth(), Future()
    assert health.model_call_stuck(call) is True
    assert health.model_call_stuck(call) is False  # reported once
    assert health.reason == STUCK_MODEL_CALL
    call.set_result(None)
    assert health.reason is None


def test_a_call_that_returned_before_it_was_reported_leaves_the_worker_healthy():
    health, call = WorkerHealth(), Future()
    call.set_result(None)
    health.model_call_stuck(call)
    assert health.reason is None


def test_the_most_lasting_reason_is_given_first():
    health, call = WorkerHealth(), Future()
    health.pool_saturated("every stage thread is held")
    assert health.reason == "every stage thread is held"
    health.model_call_stuck(call)
    assert health.reason == STUCK_MODEL_CALL
    health.accelerator_broken("device-side assert")
    assert health.reason == "device-side assert"
    call.set_result(None)
    health.pool_saturated(None)
    assert health.reason == "device-side assert"


def test_the_model_call_reports_a_broken_accelerator_to_the_health_it_was_given():
    health = WorkerHealth()

    def forward(items):
        raise RuntimeError("CUDA error: device-side assert triggered")

    from handlers.engine.clocks import Deadline, StageTimes

    call = ModelCall(forward, breaks_device=lambda exc: "device-side assert" in str(exc), health=health)
    outcomes = call.run([(0, 1.0), (1, 2.0)], Deadline(5), StageTimes())
    assert all(not outcome.ok for _, outcome in outcomes)
    assert "device-side assert" in health.reason and call.unhealthy_reason == health.reason


@pytest.mark.timeout(30)
def test_the_pool_reports_saturation_and_its_end():
    health, release, started = WorkerHealth(), threading.Event(), threading.Event()
    pool = StagePool(1, max_stuck=0, name="health-test-pool", health=health)
    try:
        def hang():
            started.set()
            release.wait(10)

        done = pool.submit(hang)
        assert started.wait(5)
        [thread] = [t for t in threading.enumerate() if t.name.startswith("health-test-pool")]
        pool.mark_stuck(thread)  # no replacement allowed: the one thread is held
        assert health.reason is not None and "held by a hung stage" in health.reason
        release.set()
        done.result(5)
        for _ in range(100):
            if health.reason is None:
                break
            threading.Event().wait(0.05)
        assert health.reason is None and not pool.saturated
    finally:
        release.set()
        pool.close(5)
