"""Admission under overload: a request that cannot be answered before its deadline is refused
the moment it arrives (a 503 in milliseconds, which its client can send elsewhere), instead of
waiting in a queue only to be dropped later.

The prediction is measured, not configured: the requests already admitted and not yet answered,
over the rate at which this server has been answering them while busy. Plain Python, no server.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

from handlers.engine.errors import ServiceUnavailable

# Weight of the newest batch in the moving rate: a few batches follow a change of load or input.
RATE_SMOOTHING = 0.3
# Share of the time left to its deadline a request's predicted answer may take: the rest is for
# the answer's way back and for batches slower than the moving rate says.
ADMITTED_SHARE_OF_TIME_LEFT = 0.8


class Admission:
    """Counts the requests in a server (admitted, not yet answered) and the rate it answers them;
    refuses a request whose predicted answer time is past its deadline. Thread-safe."""

    def __init__(self, concurrent_batches: int = 1, clock=time.monotonic):
        self._concurrent_batches = max(1, concurrent_batches)  # batches that run at once
        self._clock = clock
        self._lock = threading.Lock()
        self._inside = 0
        self._rate: Optional[float] = None  # requests/s while busy; None until a batch is seen
        self._last_end: Optional[float] = None  # when the last batch ended
        self._busy_at_last_end = False  # whether requests were waiting then
        self._largest_batch = 0  # the most requests one batch has held

    @property
    def inside(self) -> int:
        return self._inside

    @property
    def rate(self) -> Optional[float]:
        return self._rate

    def enter(self, deadline: Optional[float]) -> Optional[ServiceUnavailable]:
        """Admit a request (it then counts as inside until :meth:`leave`), or return the 503
        for one whose predicted answer would take more than :data:`ADMITTED_SHARE_OF_TIME_LEFT`
        of the time left to ``deadline`` (``time.monotonic()``; None: no deadline, always
        admitted; so is everything until a rate has been measured, and on an idle server)."""
        with self._lock:
            refused = self._refusal(deadline)
            if refused is None:
                self._inside += 1
            return refused

    def refusal(self, deadline: Optional[float]) -> Optional[ServiceUnavailable]:
        """The 503 :meth:`enter` would return now, without admitting anything: asked before a
        request's body is read, so that under overload a refusal costs no upload (the request
        is counted by :meth:`enter` once its body is in, and may still be refused then)."""
        with self._lock:
            return self._refusal(deadline)

    def _refusal(self, deadline: Optional[float]) -> Optional[ServiceUnavailable]:
        # An idle server admits: refusing then spares no one's time, and the margin below would
        # refuse every request to a model whose one call takes most of the budget.
        if deadline is None or not self._rate or self._inside <= 0:
            return None
        now = self._clock()
        expected = (self._inside + 1) / self._rate
        if expected <= ADMITTED_SHARE_OF_TIME_LEFT * (deadline - now):
            return None
        return ServiceUnavailable(
            f"overloaded: {self._inside} requests ahead at {self._rate:.3g} requests/s would answer this "
            f"one in about {expected:.2f} s, too late for its deadline ({max(0.0, deadline - now):.2f} s left); "
            f"refused before any work, send it again later or to another replica")

    def shortest_timeout(self) -> float:
        """The shortest client timeout (seconds from arrival) that :meth:`enter` would admit now;
        0 when it admits every deadline (idle, or no rate measured yet). A request that arrives
        with a shorter one is refused (its predicted answer takes more than
        :data:`ADMITTED_SHARE_OF_TIME_LEFT` of it); what a proxy in front may refuse for this
        server (``handlers.servers.haproxy_gate``)."""
        with self._lock:
            if not self._rate or self._inside <= 0:
                return 0.0
            return (self._inside + 1) / self._rate / ADMITTED_SHARE_OF_TIME_LEFT

    def leave(self) -> None:
        with self._lock:
            self._inside = max(0, self._inside - 1)

    def finished(self, answered: int, batch_size: int, started: float, ended: float) -> None:
        """A batch of ``batch_size`` requests (still inside) that ran from ``started`` to ``ended``
        (``time.monotonic()``) and answered ``answered`` of them with the model. The rate is what
        this server delivers, all its batches in flight together: when requests were waiting as
        the previous batch ended, this batch's answers count over the time since that end (the
        batch's gathering, the event loop's work, and under overload the refusals' CPU included),
        not over the model's time alone, which promises more than is delivered and admits
        requests that are answered late. With several batches in flight that interval is at
        least this batch's own time shared among them, so two batches ending together do not
        read as a burst of speed. After an idle gap, the batch's own time.

        A batch that ran with nothing waiting and fewer requests than the largest batch seen
        says how fast the replica answers the few it was given, not how fast it can answer
        (a batch of 1 takes about as long as a full one): its rate may raise the estimate but
        never lower it. Otherwise a quiet spell taught 23.8 requests/s to a replica that answers
        222, and the burst after it was refused but for 19 of 200."""
        with self._lock:
            seconds = ended - started
            saturated = self._busy_at_last_end or batch_size >= self._largest_batch
            if self._busy_at_last_end:  # set with _last_end
                seconds = max(ended - self._last_end, seconds / self._concurrent_batches)
            self._last_end = ended
            self._busy_at_last_end = self._inside > batch_size
            self._largest_batch = max(self._largest_batch, batch_size)
            if not saturated and self._rate is not None and seconds > 0 and answered / seconds < self._rate:
                return
        self.observe(answered, seconds)

    def observe(self, answered: int, seconds: float) -> None:
        """A batch that answered ``answered`` requests (those the model ran) in ``seconds``."""
        if answered <= 0 or seconds <= 0:
            return
        rate = answered / seconds
        with self._lock:
            self._rate = rate if self._rate is None else (1 - RATE_SMOOTHING) * self._rate + RATE_SMOOTHING * rate


# Share of the budget the queue may fill: the rest is for the network, the batch delay, and the
# model slowing down under overload (its cores then also read and refuse the excess). Measured
# with bench/goodput.py on 2 cores (image classifier, 74 req/s, 1 s clients): 0.9 (a queue of 34)
# answered 232 of 1051 requests late at 2x; 0.6 none.
QUEUE_SHARE_OF_BUDGET = 0.6
# The queue is sized for rounds this many times slower than timed: under a retry storm (clients
# that send again at once when refused) TorchServe's frontend refuses 800-1,800 requests a second,
# and the model gets what is left. Measured with bench/goodput.py --retry-storm on 2 cores (image
# classifier, batches of 8, capacity 36 req/s): the worker got 1.16 cores and answered 22 a
# second; a queue of two rounds (16) delivered 12 answers/s in time at 64 clients, one round 22.
STORM_SLOWDOWN = 2.0


def queue_size_for(budget_s: float, capacity_rps: float, batch_size: int, workers: int = 1) -> int:
    """The longest queue (TorchServe's ``jobQueueSize``) whose last request is still answered
    within ``budget_s``, for a model measured at ``capacity_rps`` (all its workers together).

    The queue is a whole number of rounds of batches (``batch_size × workers`` each): under
    overload the workers then always find full batches waiting when they finish. A shorter
    queue gives partial batches, and each waits maxBatchDelay for the rest; measured on 2 cores
    (image classifier, 66 req/s, batches of 16, 1 s clients), a queue of 7 delivered 46 answers/s
    in time at 2x and 43 at 4x, a queue of 16 delivered 58 and 50. The last queued request waits
    for the round in flight, then the rounds ahead of it and its own, so ``(1 + rounds) × round
    time ≤ share × budget``, ``share`` being :data:`QUEUE_SHARE_OF_BUDGET` (the rest is slack), with
    the round time at the speed a retry storm leaves the model: ``batch_size × workers /
    capacity_rps`` × :data:`STORM_SLOWDOWN`.

    Never less than one round: a model too slow for two rounds within the budget needs a smaller
    batchSize (:func:`handlers.packaging.queue_sizing.plan_queue` picks one), not a queue shorter
    than a batch, which refuses at 1x (a queue of 2 for batches of 16 did, on a slow day)."""
    if budget_s <= 0 or capacity_rps <= 0:
        raise ValueError(f"budget_s and capacity_rps must be > 0, got {budget_s!r} and {capacity_rps!r}")
    round_size = batch_size * workers
    round_s = STORM_SLOWDOWN * round_size / capacity_rps
    rounds = int(QUEUE_SHARE_OF_BUDGET * budget_s / round_s + 1e-9) - 1
    return max(1, rounds) * round_size
