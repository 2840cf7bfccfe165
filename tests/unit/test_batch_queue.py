"""The batch queue Ray Serve's replicas use (handlers.engine.batch_queue): each request gets its
own result or its own batch's error, no batch is larger than allowed, no more batches run at once
than allowed, a batch is gathered only when a slot is free (so it is full when enough wait), and a
request whose caller has gone never reaches the model."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.engine.batch_queue import BatchQueue


class Model:
    """Answers item x with x * 10; fails every batch that holds a negative item; records batches
    and how many ran at once."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.batches: list = []
        self.running = 0
        self.most_at_once = 0

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(self.seconds)
            if any(x < 0 for x in items):
                raise ValueError(f"bad batch {items}")
            return [x * 10 for x in items]
        finally:
            self.running -= 1


@settings(max_examples=60, deadline=None)
@given(items=st.lists(st.integers(-3, 50), min_size=1, max_size=40),
       max_batch_size=st.integers(1, 9), concurrent=st.integers(1, 3),
       gaps_ms=st.lists(st.sampled_from([0, 0, 0, 1, 2]), min_size=40, max_size=40),
       model_ms=st.sampled_from([0, 1, 3]))
def test_each_request_gets_its_own_answer_or_its_own_batchs_error(items, max_batch_size, concurrent, gaps_ms,
                                                                  model_ms):
    model = Model(model_ms / 1000)

    async def scenario():
        queue = BatchQueue(model, max_batch_size, 0.002, concurrent)
        tasks = []
        for item, gap in zip(items, gaps_ms):
            tasks.append(asyncio.create_task(queue.submit(item)))
            await asyncio.sleep(gap / 1000)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        queue.close()
        return results

    results = asyncio.run(scenario())
    batch_of = {}
    for batch in model.batches:
        assert 1 <= len(batch) <= max_batch_size
        for position, item in enumerate(batch):
            batch_of.setdefault(item, []).append(batch)
    assert sorted(x for batch in model.batches for x in batch) == sorted(items)  # each ran once
    assert model.most_at_once <= concurrent
    for item, result in zip(items, results):
        failed = [b for b in batch_of[item] if any(x < 0 for x in b)]
        if isinstance(result, Exception):
            assert isinstance(result, ValueError) and failed  # its own batch failed
        else:
            assert result == item * 10
            assert len(failed) < len(batch_of[item])  # an equal item may have been in a failed batch


def test_a_batch_is_gathered_when_the_model_is_free_so_it_is_full_when_enough_wait():
    """@serve.batch closes a batch max_wait after its first request even while the model is busy;
    then the batch waits with what it has. Here requests that arrive during a long batch, spread
    over more than max_wait, make one full batch."""
    model = Model(seconds=0.3)

    async def scenario():
        queue = BatchQueue(model, 8, 0.02, 1)
        first = asyncio.create_task(queue.submit(0))
        await asyncio.sleep(0.05)  # the first batch runs (alone) for 0.3 s
        later = []
        for item in range(1, 9):
            later.append(asyncio.create_task(queue.submit(item)))
            await asyncio.sleep(0.025)  # > max_wait between arrivals
        await asyncio.wait_for(asyncio.gather(first, *later), 10)
        queue.close()

    asyncio.run(scenario())
    assert model.batches == [[0], list(range(1, 9))]


def test_a_lone_request_is_answered_after_at_most_max_wait_not_held_for_a_full_batch():
    model = Model()

    async def scenario():
        queue = BatchQueue(model, 16, 0.01, 1)
        result = await asyncio.wait_for(queue.submit(7), 5)
        queue.close()
        return result

    assert asyncio.run(scenario()) == 70
    assert model.batches == [[7]]


def test_a_request_whose_caller_has_gone_never_reaches_the_model():
    model = Model(seconds=0.2)

    async def scenario():
        queue = BatchQueue(model, 4, 0.0, 1)
        running = asyncio.create_task(queue.submit(1))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(queue.submit(2))
        kept = asyncio.create_task(queue.submit(3))
        await asyncio.sleep(0.02)
        gone.cancel()  # its client hung up while it queued
        assert await asyncio.wait_for(kept, 5) == 30
        assert await running == 10
        with pytest.raises(asyncio.CancelledError):
            await gone
        queue.close()

    asyncio.run(scenario())
    assert model.batches == [[1], [3]]


def test_a_wrong_number_of_results_is_an_error_for_that_batch_only():
    calls = []

    async def short(items):
        calls.append(items)
        return [0] * (len(items) - 1) if len(calls) == 1 else [x for x in items]

    async def scenario():
        queue = BatchQueue(short, 2, 0.0, 1)
        first = [asyncio.create_task(queue.submit(x)) for x in (1, 2)]
        done = await asyncio.gather(*first, return_exceptions=True)
        second = await queue.submit(3)
        queue.close()
        return done, second

    done, second = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) and "2 requests got 1 results" in str(r) for r in done)
    assert second == 3


def test_settings_are_checked_and_may_change_between_batches():
    with pytest.raises(ValueError, match="max_batch_size >= 1"):
        BatchQueue(Model(), 0, 0.01)
    model = Model()

    async def scenario():
        queue = BatchQueue(model, 1, 0.0, 1)
        await queue.submit(1)
        queue.configure(3, 0.05)
        with pytest.raises(ValueError, match="max_batch_size >= 1"):
            queue.configure(0, 0.05)  # a redeployment's user_config is checked too
        await asyncio.gather(*(queue.submit(x) for x in (2, 3, 4)))
        queue.close()

    asyncio.run(scenario())
    assert model.batches == [[1], [2, 3, 4]]
