"""TorchServe's queue sized from a budget: ``jobQueueSize`` (and, where the budget is tight, a
smaller ``batchSize``) for a model config that declares ``handler.request_budget_s``, from what
the model's own batches cost. Plain Python: :func:`plan_queue` is a pure function of the batch
times it is given, :func:`model_cost` turns timings into a batch time that the machine's
momentary load does not move.

Why the archive and not the server: TorchServe's frontend does not tell the worker when a request
arrived, so the handler cannot shed what waited too long in the frontend's queue; the queue's
length is the only bound on that wait (docs/queueing.md, "Under overload").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from handlers.engine.admission import QUEUE_SHARE_OF_BUDGET, queue_size_for
from handlers.engine.settings import SECTION

BUDGET_KEY = "request_budget_s"  # in the handler: section; the longest any client of the model waits
# Batches timed per size, after one to warm up: their minimum is the model's own cost. At least
# TIMED_BATCHES, more while they cost under TIMING_S in all (a fast model gets many, at no cost),
# at most MOST_TIMED, and none more once TIMING_WALL_S passed (the archive command, and with it the
# test session's set-up, times every budgeted example). On the loaded 2-core machine 3 batches of
# text_embedding gave 0.14 s in one run, 0.21 s in another.
TIMED_BATCHES = 3
TIMING_S = 1.0
MOST_TIMED = 10
TIMING_WALL_S = 5.0
# What a batch costs on TorchServe beyond the handler's own work, which the archive tool cannot
# time: the frontend's round trip to the worker per batch, and its HTTP work per request.
# Measured on the 2-core machine: an idle tabular request answered in 11 ms, 5 of them
# maxBatchDelay; quickstart (a model of no cost) drains 400-1,000 requests/s.
FRONTEND_BATCH_S = 0.005
FRONTEND_REQUEST_S = 0.001
# Batch times are rounded up to this step before sizing: jitter below it cannot move a plan.
TIME_STEP_S = 0.01


@dataclass(frozen=True)
class QueuePlan:
    """What a budget makes of TorchServe's keys: ``jobQueueSize`` and ``batchSize`` (the
    config's, or a smaller one when two of its batches do not fit the budget's share), the batch
    time it was sized with, and ``note``: a line saying what was changed and why, or None."""

    job_queue_size: int
    batch_size: int
    batch_time_s: float
    note: Optional[str] = None


def budget_of(model_config: Mapping[str, Any]) -> float:
    """The model config's ``handler.request_budget_s`` in seconds (0: none declared)."""
    budget = (model_config.get(SECTION) or {}).get(BUDGET_KEY, 0) or 0
    return float(budget) if isinstance(budget, (int, float)) and not isinstance(budget, bool) else 0.0


def smaller_sizes(batch_size: int) -> list:
    """The batch sizes the plan may choose, largest first: the config's, then halved down to 1.
    Few and far apart, so that a batch time a little off cannot move the choice by one."""
    sizes = [batch_size]
    while sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    return sizes


def served_time(handler_s: float, batch_size: int) -> float:
    """A batch's time on TorchServe from the handler's own time for it (frontend costs added),
    rounded up to :data:`TIME_STEP_S`."""
    seconds = handler_s + FRONTEND_BATCH_S + FRONTEND_REQUEST_S * batch_size
    steps = -(-round(seconds / TIME_STEP_S, 6) // 1)  # ceiling, after rounding away float noise
    return max(1, int(steps)) * TIME_STEP_S


def plan_queue(budget_s: float, batch_size: int, time_of: Callable[[int], float], workers: int = 1) -> QueuePlan:
    """``jobQueueSize`` and ``batchSize`` for clients that wait ``budget_s``, a model whose
    batch of ``size`` takes ``time_of(size)`` seconds on TorchServe (:func:`served_time`) on each
    of ``workers`` workers.

    The batch: the largest of :func:`smaller_sizes` with two batches (the one in flight and one
    waiting) within :data:`QUEUE_SHARE_OF_BUDGET` of the budget (1 when none is). The queue:
    whole rounds of ``batch × workers`` (under overload a worker then always finds a full batch
    waiting), as many as leave the last queued request answered within that share: the round in
    flight, the rounds ahead, its own, each at the speed a retry storm leaves the model
    (:data:`~handlers.engine.admission.STORM_SLOWDOWN` times slower than timed). At least one
    round: a queue shorter than a batch gives partial batches, each waiting maxBatchDelay for the
    rest, and refuses at 1x (a queue of 2 for batches of 16 on a slow day)."""
    if budget_s <= 0 or batch_size < 1 or workers < 1:
        raise ValueError(f"budget_s, batch_size and workers must be > 0, got {budget_s!r}, {batch_size!r} and "
                         f"{workers!r}")
    share = QUEUE_SHARE_OF_BUDGET * budget_s
    times = {}
    for size in smaller_sizes(batch_size):
        times[size] = time_of(size)
        if times[size] <= 0:
            raise ValueError(f"a batch of {size} must take > 0 s, got {times[size]!r}")
        if 2 * times[size] <= share:
            break
    seconds = times[size]
    note = None
    if size != batch_size:
        note = (f"batchSize {batch_size} -> {size}: two batches of {batch_size} ({times[batch_size]:.2f} s each) do "
                f"not fit {QUEUE_SHARE_OF_BUDGET:g} of {BUDGET_KEY} {budget_s:g} s; a batch of {size} takes "
                f"{seconds:.2f} s")
    if 2 * seconds > share:
        note = (f"{note}; " if note else "") + (
            f"even two batches of {size} ({seconds:.2f} s each) do not fit {QUEUE_SHARE_OF_BUDGET:g} of "
            f"{BUDGET_KEY} {budget_s:g} s: answers may come late; add workers or replicas, or raise the budget")
    return QueuePlan(queue_size_for(budget_s, workers * size / seconds, size, workers), size, seconds, note)


def run_queue_snapshot() -> Optional[dict]:
    """Each thread of this process: nanoseconds on a CPU and waiting for one (runnable, not run),
    from Linux's ``/proc/self/task/*/schedstat``; None where that is not there."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    snapshot = {}
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as stat:
                running, waiting = stat.read().split()[:2]
            snapshot[task] = (int(running), int(waiting))
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
    return snapshot or None


def on_cpu_share(before: Optional[dict], after: Optional[dict]) -> float:
    """Of the time this process's threads were runnable between two snapshots, the share they
    ran (1 on an idle machine, or without snapshots)."""
    if not before or not after:
        return 1.0
    both = [task for task in before if task in after]
    running = sum(after[task][0] - before[task][0] for task in both)
    waiting = sum(after[task][1] - before[task][1] for task in both)
    return running / (running + waiting) if running > 0 and waiting >= 0 else 1.0


def model_cost(run_batch: Callable[[], Any], clock=time.perf_counter,
               snapshot: Callable[[], Optional[dict]] = run_queue_snapshot) -> float:
    """Seconds ``run_batch()`` takes on this machine when nothing else runs, whatever else ran
    meanwhile: one call to warm up, then the fastest of a few (:data:`TIMED_BATCHES` or more), each
    timed without the time its threads waited for a CPU that other work held (the wall time scaled
    by the share of their runnable time they ran; :func:`run_queue_snapshot`). The wait removes a
    load that lasts (measured on the 2-core machine at load average 12-15, the image classifier's
    batch of 16: 1.96 s at its fastest, 0.37 s without the wait); the minimum removes what the wait
    does not show (a batch slowed by sharing caches and cores)."""
    run_batch()
    costs, began = [], clock()
    while len(costs) < TIMED_BATCHES or (sum(costs) < TIMING_S and len(costs) < MOST_TIMED
                                         and clock() - began < TIMING_WALL_S):
        before, started = snapshot(), clock()
        run_batch()
        elapsed = clock() - started
        costs.append(elapsed * on_cpu_share(before, snapshot()))
    return min(costs)
