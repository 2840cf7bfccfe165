"""The batching engine alone: plain Python stages, no torch, no TorchServe."""

import threading

import pytest

from handlers import BadRequest, EngineSettings
from handlers.engine.batch_engine import BatchEngine, plan_micro_batches

# A model you can compute by hand: y = 2x + 1.


def parse(request):
    if not isinstance(request, (int, float)):
        raise BadRequest(f"expected a number, got {request!r}")
    return float(request)


def affine(items):
    return [2 * x + 1 for x in items]


def as_dict(output, item):
    return {"input": item, "output": output}


def engine(micro_batch_size=None, **stages):
    settings = EngineSettings(micro_batch_size=micro_batch_size, pool_size=4, deadline_s=10)
    return BatchEngine(
        stages.get("preprocess", parse),
        stages.get("infer", affine),
        stages.get("postprocess", as_dict),
        settings,
    )


def preprocess_hanging_on_negative(release: threading.Event):
    """A preprocess stage that hangs on a negative request until the test sets ``release``."""

    def preprocess(request):
        if request < 0:
            release.wait(60)
        return float(request)

    return preprocess


def model_hanging_on_big(release: threading.Event):
    """The affine model, hanging on a micro-batch holding a value over 100 until ``release``."""

    def infer(items):
        if max(items) > 100:
            release.wait(60)
        return affine(items)

    return infer


def values(report):
    return [outcome.value if outcome.ok else outcome.error.status for outcome in report.outcomes]


@pytest.mark.parametrize("batch_size, micro, expected", [
    (7, 3, [3, 3, 1]), (7, None, [7]), (1, 8, [1]), (64, 8, [8] * 8), (0, 3, []),
])
def test_plan_micro_batches_covers_every_position_once(batch_size, micro, expected):
    plan = plan_micro_batches(batch_size, micro)
    assert [len(r) for r in plan] == expected
    assert [i for r in plan for i in r] == list(range(batch_size))


@pytest.mark.parametrize("batch_size", [1, 2, 7, 64])
@pytest.mark.parametrize("micro_batch_size", [1, 3, 8, None])
def test_results_in_request_order_and_equal_to_each_alone(batch_size, micro_batch_size):
    requests = [float(i * 3 - 5) for i in range(batch_size)]
    with engine(micro_batch_size) as e:
        batched = values(e.run(requests))
        alone = [values(e.run([r]))[0] for r in requests]
    assert batched == alone
    assert batched == [{"input": r, "output": 2 * r + 1} for r in requests]


def test_micro_batches_reach_the_model_in_the_planned_sizes():
    seen = []

    def recording(items):
        seen.append(len(items))
        return affine(items)

    with engine(3, infer=recording) as e:
        report = e.run(list(range(7)))
    assert seen == [3, 3, 1]
    assert report.micro_batch_sizes == [3, 3, 1]


def test_a_malformed_request_gets_its_4xx_and_the_others_their_results():
    with engine(3) as e:
        report = e.run([1.0, "not a number", 3.0, 4.0])
    bad = report.outcomes[1]
    assert not bad.ok and bad.error.status == 400
    assert "expected a number" in bad.error.to_json()["message"]
    assert values(report)[0] == {"input": 1.0, "output": 3.0}
    assert values(report)[2:] == [{"input": 3.0, "output": 7.0}, {"input": 4.0, "output": 9.0}]


def test_only_a_request_error_in_preprocessing_is_a_4xx_and_any_other_error_a_500():
    def picky(request):
        if request == "bad":
            raise BadRequest("cannot parse")
        if request == "value":
            raise ValueError("a bug of the handler: not the request's doing")
        if request == "bug":
            raise KeyError("oops")
        return 1.0

    with engine(preprocess=picky) as e:
        report = e.run(["bad", "value", "bug", "fine"])
    assert values(report)[:3] == [400, 500, 500]
    assert report.outcomes[3].ok


def test_a_poison_item_fails_alone_and_its_micro_batch_neighbours_succeed():
    calls = []

    def poisoned(items):
        calls.append(list(items))
        if 13.0 in items:
            raise RuntimeError("the model chokes on 13")
        return affine(items)

    requests = [float(i) for i in range(10, 18)]
    with engine(8, infer=poisoned) as e:
        report = e.run(requests)
    statuses = [200 if o.ok else o.error.status for o in report.outcomes]
    assert statuses == [200, 200, 200, 500, 200, 200, 200, 200]
    assert "the model chokes on 13" in report.outcomes[3].error.message
    assert [o.value["output"] for o in report.outcomes if o.ok] == [2 * r + 1 for r in requests if r != 13.0]
    # Bisection, not one call per item: 8 → 4+4 → 2+2 → 1+1.
    assert len(calls) <= 7


def test_an_exception_for_a_whole_micro_batch_fails_only_that_micro_batch():
    def broken_second_micro_batch(items):
        if items[0] >= 3:
            raise RuntimeError("device error")
        return affine(items)

    with engine(3, infer=lambda items: broken_second_micro_batch(items) if items[0] < 6 else affine(items)) as e:
        report = e.run([float(i) for i in range(8)])
    statuses = [200 if o.ok else o.error.status for o in report.outcomes]
    assert statuses == [200, 200, 200, 500, 500, 500, 200, 200]


def test_out_of_memory_in_inference_is_a_507():
    def oom_on_big(items):
        if any(x > 100 for x in items):
            raise MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return affine(items)

    with engine(4, infer=oom_on_big) as e:
        report = e.run([1.0, 1000.0, 2.0])
    assert values(report) == [{"input": 1.0, "output": 3.0}, 507, {"input": 2.0, "output": 5.0}]
    assert report.outcomes[1].error.to_json()["type"] == "OutOfMemory"


def test_a_wrong_number_of_outputs_is_caught_not_mismatched_nor_retried():
    with engine(4, infer=lambda items: affine(items)[:-1] if len(items) > 1 else affine(items)) as e:
        report = e.run([1.0, 2.0, 3.0])
    # A broken split contract is the handler's bug: splitting the micro-batch cannot cure it.
    assert values(report) == [500, 500, 500]
    assert "must return one output per item" in report.outcomes[0].error.message
    assert report.model_calls == 1


def test_a_failure_in_postprocessing_fails_only_that_request():
    def fragile(output, item):
        if item == 2.0:
            raise ZeroDivisionError("division by zero")
        return output

    with engine(postprocess=fragile) as e:
        report = e.run([1.0, 2.0, 3.0])
    assert values(report) == [3.0, 500, 7.0]
    assert report.outcomes[1].error.to_json() == {
        "code": 500,
        "type": "PostprocessFailed",
        "message": "postprocessing failed: ZeroDivisionError: division by zero",
    }


@pytest.mark.timeout(20)
def test_a_hanging_stage_answers_with_a_504_at_the_deadline_instead_of_hanging():
    release = threading.Event()

    hangs_on_negative = preprocess_hanging_on_negative(release)

    settings = EngineSettings(micro_batch_size=2, pool_size=2, deadline_s=1.0)
    e = BatchEngine(hangs_on_negative, affine, as_dict, settings)
    try:
        report = e.run([1.0, -1.0, 2.0, 3.0])
        statuses = [200 if o.ok else o.error.status for o in report.outcomes]
        assert statuses[1] == 504
        assert "preprocessing did not finish" in report.outcomes[1].error.message
        # Its micro-batch mate and the others still get their answers.
        assert values(report)[0] == {"input": 1.0, "output": 3.0}
        assert values(report)[2:] == [{"input": 2.0, "output": 5.0}, {"input": 3.0, "output": 7.0}]
    finally:
        release.set()
        assert e.close(timeout=10)


@pytest.mark.timeout(20)
def test_a_hanging_model_answers_with_504_for_its_micro_batch():
    release = threading.Event()

    hangs_on_big = model_hanging_on_big(release)

    settings = EngineSettings(micro_batch_size=2, pool_size=2, deadline_s=0.5)
    e = BatchEngine(parse, hangs_on_big, as_dict, settings)
    try:
        report = e.run([1.0, 2.0, 500.0, 3.0])
        statuses = [200 if o.ok else o.error.status for o in report.outcomes]
        assert statuses == [200, 200, 504, 504]
    finally:
        release.set()
        assert e.close(timeout=10)


@pytest.mark.timeout(20)
def test_inference_of_one_micro_batch_starts_before_preprocessing_of_the_last_ends():
    """The pipeline is real: the last request's preprocessing cannot finish until inference of the
    first micro-batch has started. Stage after stage would never get there (the test times out)."""
    first_inference_started = threading.Event()
    overlapped = []

    def preprocess(request):
        if request == 5.0:  # last request, in the last micro-batch
            overlapped.append(first_inference_started.wait(timeout=10))
        return float(request)

    def infer(items):
        first_inference_started.set()
        return affine(items)

    settings = EngineSettings(micro_batch_size=2, pool_size=2, deadline_s=15)
    with BatchEngine(preprocess, infer, as_dict, settings) as e:
        report = e.run([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert overlapped == [True]
    assert all(o.ok for o in report.outcomes)


def test_batches_from_several_threads_do_not_mix():
    barrier = threading.Barrier(4)
    results = {}

    def client(k):
        barrier.wait(timeout=10)
        requests = [float(100 * k + i) for i in range(16)]
        results[k] = (requests, values(shared.run(requests)))

    with engine(3) as shared:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
    assert sorted(results) == [0, 1, 2, 3]
    for requests, got in results.values():
        assert got == [{"input": r, "output": 2 * r + 1} for r in requests]


def engine_threads():
    return [t for t in threading.enumerate() if t.name.startswith("microbatch-")]


def test_close_stops_every_thread_and_is_idempotent():
    before = set(engine_threads())
    e = engine(2)
    e.run([1.0, 2.0, 3.0, 4.0, 5.0])
    assert set(engine_threads()) - before, "the run should have started pool threads"
    assert e.close() is True
    assert e.close() is True
    assert set(engine_threads()) - before == set()


def test_a_batch_after_close_gets_500s_not_an_exception():
    e = engine()
    e.close()
    report = e.run([1.0, 2.0])
    assert [o.error.status for o in report.outcomes] == [500, 500]
    assert "the handler failed on this batch" in report.outcomes[0].error.message


def test_out_of_memory_splits_the_micro_batch_and_caps_later_ones(caplog):
    sizes = []

    def fits_four(items):
        sizes.append(len(items))
        if len(items) > 4:
            raise MemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return affine(items)

    with engine(None, infer=fits_four) as e:
        first = e.run([float(i) for i in range(16)])
        assert all(o.ok for o in first.outcomes)  # 16 → 8 → 4: everyone answered
        assert e.safe_micro_batch_size == 4  # 8 ran out of memory, 4 fitted
        assert "capped at 4" in caplog.text
        sizes.clear()
        second = e.run([float(i) for i in range(16)])
    assert all(o.ok for o in second.outcomes)
    assert sizes == [4, 4, 4, 4]  # no more failing attempts at 16
    assert second.micro_batch_sizes == [4, 4, 4, 4]


def test_a_size_hint_groups_like_sized_requests_and_answers_stay_in_order():
    seen = []

    def infer(items):
        seen.append(sorted(items))
        return affine(items)

    settings = EngineSettings(micro_batch_size=3, pool_size=2, deadline_s=10)
    requests = [50.0, 1.0, 40.0, 2.0, 60.0, 3.0]
    with BatchEngine(parse, infer, as_dict, settings, size_hint=lambda r: r) as e:
        report = e.run(requests)
    assert sorted(seen) == [[1.0, 2.0, 3.0], [40.0, 50.0, 60.0]]
    assert values(report) == [{"input": r, "output": 2 * r + 1} for r in requests]


def test_a_size_hint_that_raises_does_not_fail_the_batch():
    def picky_hint(request):
        if not isinstance(request, float):
            raise TypeError("no size for that")
        return request

    settings = EngineSettings(micro_batch_size=2, pool_size=2, deadline_s=10)
    with BatchEngine(parse, affine, as_dict, settings, size_hint=picky_hint) as e:
        report = e.run([3.0, "bad", 1.0])
    assert values(report) == [{"input": 3.0, "output": 7.0}, 400, {"input": 1.0, "output": 3.0}]


@pytest.mark.timeout(30)
def test_when_every_pool_thread_hangs_a_replacement_thread_keeps_the_worker_serving(caplog):
    release = threading.Event()

    hangs_on_negative = preprocess_hanging_on_negative(release)

    settings = EngineSettings(pool_size=1, deadline_s=1.0)
    e = BatchEngine(hangs_on_negative, affine, as_dict, settings)
    try:
        assert values(e.run([-1.0])) == [504]
        # Its one pool thread is still held by the hung request; the next batch is answered.
        assert values(e.run([2.0, 3.0])) == [{"input": 2.0, "output": 5.0}, {"input": 3.0, "output": 7.0}]
        assert "started a replacement thread" in caplog.text
    finally:
        release.set()
        assert e.close(timeout=10)
