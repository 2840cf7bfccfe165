"""TorchServe's queue sized from a budget (handlers.packaging.queue_sizing): the plan is a pure
function of the batch times, whole rounds never below one, and the batch time the archive tool
takes does not follow the machine's momentary load."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.engine.admission import QUEUE_SHARE_OF_BUDGET, STORM_SLOWDOWN
from handlers.packaging.queue_sizing import (FRONTEND_BATCH_S, FRONTEND_REQUEST_S, MOST_TIMED, TIME_STEP_S,
                                             TIMED_BATCHES, budget_of, model_cost, on_cpu_share, plan_queue,
                                             run_queue_snapshot, served_time, smaller_sizes)


def times(table):
    """``time_of`` from a table of batch size -> seconds, recording what was asked."""
    asked = []

    def time_of(size):
        asked.append(size)
        return table[size]

    time_of.asked = asked
    return time_of


def test_the_image_classifier_on_a_quiet_machine_keeps_its_batch_and_queues_one_round():
    # 2 cores, quiet: batches of 16 in 0.24 s on TorchServe (66 req/s), 1 s clients.
    time_of = times({16: 0.24})
    plan = plan_queue(1.0, 16, time_of)
    assert (plan.batch_size, plan.job_queue_size, plan.note) == (16, 16, None)
    assert time_of.asked == [16]  # a batch that fits is not made smaller


def test_on_a_slow_day_the_batch_is_halved_instead_of_a_queue_shorter_than_a_batch():
    """Regression (issue 30): one batch took half the budget and the formula left a queue of 2
    for batches of 16, which refused at 1x. Now: a smaller batch, and a queue of whole batches."""
    time_of = times({16: 0.50, 8: 0.27, 4: 0.15})
    plan = plan_queue(1.0, 16, time_of)
    assert (plan.batch_size, plan.job_queue_size) == (8, 8)
    assert time_of.asked == [16, 8]
    assert plan.note.startswith("batchSize 16 -> 8: two batches of 16 (0.50 s each) do not fit 0.6 of "
                                "request_budget_s 1 s")


def test_a_model_too_slow_even_for_batches_of_one_gets_one_round_and_says_so():
    plan = plan_queue(1.0, 4, times({4: 2.0, 2: 1.5, 1: 1.2}), workers=2)
    assert (plan.batch_size, plan.job_queue_size) == (1, 2)
    assert "even two batches of 1 (1.20 s each) do not fit" in plan.note


def test_a_fast_model_queues_many_rounds_and_workers_make_rounds_larger():
    # Rounds at half their timed speed (a retry storm's, STORM_SLOWDOWN): (1 + rounds) × 2 × round ≤ 0.6.
    assert plan_queue(1.0, 64, times({64: 0.08})).job_queue_size == 2 * 64  # (1 + 2) × 0.16 ≤ 0.6
    assert plan_queue(1.0, 16, times({16: 0.1}), workers=2).job_queue_size == 2 * 32  # (1 + 2) × 0.2 ≤ 0.6
    assert plan_queue(3.0, 16, times({16: 0.1})).job_queue_size == 8 * 16  # (1 + 8) × 0.2 ≤ 1.8


@pytest.mark.parametrize("budget, batch, workers", [(0, 16, 1), (-1, 16, 1), (1, 0, 1), (1, 16, 0)])
def test_nonsense_is_refused(budget, batch, workers):
    with pytest.raises(ValueError):
        plan_queue(budget, batch, lambda size: 0.1, workers)


monotone_times = st.lists(st.floats(0.001, 5.0), min_size=8, max_size=8).map(sorted)


@settings(max_examples=300, deadline=None)
@given(budget=st.floats(0.05, 30.0), batch=st.integers(1, 128), workers=st.integers(1, 8), costs=monotone_times)
def test_whole_rounds_never_below_one_and_the_largest_batch_that_fits(budget, batch, workers, costs):
    """Whatever the model (a larger batch never faster): the queue is whole rounds, at least one;
    the batch is the largest halving whose two batches fit the share of the budget; and with it,
    the round in flight, the rounds ahead and the last request's own fit that share at a retry
    storm's speed (STORM_SLOWDOWN), and one more round would not."""
    sizes = smaller_sizes(batch)
    table = dict(zip(sorted(sizes), costs))  # smallest size, smallest time
    plan = plan_queue(budget, batch, lambda size: table[size], workers)
    share = QUEUE_SHARE_OF_BUDGET * budget
    round_size = plan.batch_size * workers
    assert plan.job_queue_size >= round_size and plan.job_queue_size % round_size == 0
    fitting = [size for size in sizes if 2 * table[size] <= share]
    assert plan.batch_size == (fitting[0] if fitting else 1)
    rounds = plan.job_queue_size // round_size
    storm_round_s = STORM_SLOWDOWN * plan.batch_time_s
    if 2 * storm_round_s <= share * (1 - 1e-9):  # more than one round fits at a storm's speed
        assert (1 + rounds) * storm_round_s <= share * (1 + 1e-9)
        assert (2 + rounds) * storm_round_s > share * (1 - 1e-9)
    elif 2 * storm_round_s > share * (1 + 1e-9):
        assert rounds == 1


def test_the_batch_sizes_are_halvings_of_the_configs():
    assert smaller_sizes(16) == [16, 8, 4, 2, 1]
    assert smaller_sizes(24) == [24, 12, 6, 3, 1]
    assert smaller_sizes(1) == [1]


class Machine:
    """A fake clock and schedstat (:func:`run_queue_snapshot`'s form): each batch runs on
    ``threads`` threads at once, each ``cost`` s on a CPU plus ``slowed`` s more (caches and cores
    shared with other work: it shows as time on a CPU) and ``waited`` s waiting for one."""

    def __init__(self, threads=2, schedstat=True):
        self.now, self.schedstat = 0.0, schedstat
        self.tasks = {str(100 + n): [0, 0] for n in range(threads)}

    def clock(self):
        return self.now

    def snapshot(self):
        return {task: tuple(times) for task, times in self.tasks.items()} if self.schedstat else None

    def batches(self, cost, loads):
        """``run_batch`` for :func:`model_cost`: the n-th call meets ``loads[n]`` = (slowed, waited)."""
        loads = iter(loads)

        def run_batch():
            slowed, waited = next(loads, (0.0, 0.0))
            self.now += cost + slowed + waited
            for times in self.tasks.values():
                times[0] += round((cost + slowed) * 1e9)
                times[1] += round(waited * 1e9)

        return run_batch


def cost_under(cost, loads, **machine):
    machine = Machine(**machine)
    return model_cost(machine.batches(cost, loads), clock=machine.clock, snapshot=machine.snapshot)


@settings(max_examples=200, deadline=None)
@given(cost=st.floats(0.001, 2.0), waits=st.lists(st.floats(0.0, 20.0), min_size=6, max_size=6),
       threads=st.integers(1, 8))
def test_a_load_that_lasts_is_taken_out_by_the_time_the_threads_waited_for_a_cpu(cost, waits, threads):
    """Every timed batch slowed, up to 10 times its own cost: the estimate is still the model's
    own, as on an idle machine (the earlier tool's median followed the load: 16, 14, 6)."""
    assert cost_under(cost, [(0.0, wait) for wait in waits], threads=threads) == pytest.approx(cost, rel=1e-6)


@settings(max_examples=200, deadline=None)
@given(cost=st.floats(0.001, 2.0), slowed=st.lists(st.floats(0.0, 10.0), min_size=6, max_size=6),
       quiet=st.integers(1, TIMED_BATCHES), schedstat=st.booleans())
def test_what_the_wait_does_not_show_goes_with_the_fastest_batch(cost, slowed, quiet, schedstat):
    """A slowdown that shows as time on a CPU (caches, shared cores), or any slowdown where there is
    no schedstat: one undisturbed timed batch of the few suffices."""
    slowed[quiet] = 0.0  # call 0 is the warm-up, never timed
    assert cost_under(cost, [(s, 0.0) for s in slowed], schedstat=schedstat) == pytest.approx(cost, rel=1e-6)


@pytest.mark.parametrize("cost, waited, timed", [
    (0.001, 0.0, MOST_TIMED),      # a fast model: many batches, in milliseconds
    (0.3, 0.0, 4),                 # until they cost TIMING_S: 4 × 0.3 s
    (3.0, 0.0, TIMED_BATCHES),     # a slow one: the fewest
    (0.4, 9.6, TIMED_BATCHES),     # a crowded machine: 10 s a batch, past TIMING_WALL_S after the fewest
])
def test_how_many_batches_are_timed(cost, waited, timed):
    machine, calls = Machine(), []
    run = machine.batches(cost, [(0.0, waited)] * 100)
    model_cost(lambda: (calls.append(1), run()), clock=machine.clock, snapshot=machine.snapshot)
    assert len(calls) == 1 + timed  # and the warm-up


def test_the_archive_holds_the_same_plan_under_load_as_on_an_idle_machine():
    """Regression (issue 30): the earlier tool took the median of 3 batches, and the written
    batchSize was 16, 14 and 6 in three runs on a loaded machine. Here: the image classifier's
    batches cost 0.22 s (16) and 0.12 s (8); every timed batch waits for a CPU (up to 2 s) and
    all but one are slowed besides, and the plan stays the idle machine's."""
    own = {16: 0.22, 8: 0.12, 4: 0.07, 2: 0.05, 1: 0.04}
    idle = plan_queue(1.0, 16, lambda size: served_time(own[size], size))
    patterns = [[(0.4, 1.0), (0.3, 2.0), (1.5, 0.5), (0.0, 1.7), (0.9, 0.1), (0.2, 0.3)],
                [(0.5, 0.2), (0.0, 1.0), (1.1, 1.9), (0.9, 0.3), (0.4, 0.6), (1.5, 0.2)],
                [(1.0, 0.1), (0.8, 0.5), (0.0, 0.8), (0.6, 1.4), (0.3, 0.9), (1.2, 1.1)]]
    for order in itertools.permutations(patterns):
        loads = iter(order)
        plan = plan_queue(1.0, 16, lambda size: served_time(cost_under(own[size], next(loads)), size))
        assert plan == idle
    assert (idle.batch_size, idle.job_queue_size) == (16, 16)


def test_the_snapshot_reads_this_process_threads_where_linux_has_them():
    import os
    import threading

    snapshot = run_queue_snapshot()
    if not os.path.exists("/proc/self/task"):
        assert snapshot is None
        return
    assert str(threading.get_native_id()) in snapshot
    assert all(running >= 0 and waiting >= 0 for running, waiting in snapshot.values())
    assert on_cpu_share(snapshot, None) == on_cpu_share({}, snapshot) == 1.0
    assert on_cpu_share({"1": (0, 0)}, {"1": (3, 1)}) == 0.75


def test_a_served_batch_adds_the_frontends_costs_and_is_rounded_up_to_the_step():
    seconds = served_time(0.2, 16)
    assert seconds == pytest.approx(0.23)  # 0.2 + 5 ms + 16 × 1 ms = 0.221, up to 0.23
    assert 0.2 + FRONTEND_BATCH_S + 16 * FRONTEND_REQUEST_S <= seconds < 0.221 + TIME_STEP_S
    # Jitter within a step does not move it.
    assert served_time(0.2001, 16) == served_time(0.2089, 16) == seconds
    assert served_time(0.0, 1) == pytest.approx(TIME_STEP_S)


@pytest.mark.parametrize("config, budget", [
    ({"handler": {"request_budget_s": 1.5}}, 1.5),
    ({"handler": {"request_budget_s": 2}}, 2.0),
    ({"handler": {}}, 0.0),
    ({}, 0.0),
    ({"handler": None}, 0.0),
    ({"handler": {"request_budget_s": True}}, 0.0),
])
def test_the_budget_is_read_from_the_handler_section(config, budget):
    assert budget_of(config) == budget
