"""Evidence that goes on in production: now and then, a request that was answered as part of a
micro-batch of several is run again alone, on model time nobody is waiting for, and its part
of the batched output compared with its output alone.

The start-up self-test proves the layout and batch invariance on samples; live traffic may hold
what the samples did not (a size set by the data that happened to follow the micro-batch size,
padding that leaks only at lengths the samples lacked). A disagreement is handed to
``on_disagreement`` (the handler refutes the layout for good: every later request is answered
alone), logged and counted.

Cost: the audit spends at most ``share`` of the model time it watches (a lone call is run once
the model calls since the last one have earned its time), and only when the engine has no batch
in flight. Plain Python; the comparison and the lone call come in as functions.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

DEFAULT_SHARE = 0.01


class Audit:
    """Holds one candidate (a request's item and a copy of its batched part) and runs it alone
    when the budget allows.

    Args:
        run_alone: ``item -> part``: the model on the item alone, cut for a micro-batch of one.
        compare: ``(alone, batched, item) -> difference in words, or None`` (the self-test's
            tolerance; ``item``: the request's, to compare answers as its client gets them).
        on_disagreement: ``reason -> None``.
        share: the most of the model's time audits may take (0 turns them off).
    """

    def __init__(self, run_alone: Callable[[Any], Any], compare: Callable[[Any, Any, Any], Optional[str]],
                 on_disagreement: Callable[[str], None], share: float = DEFAULT_SHARE, seed: int = 0):
        self._run_alone = run_alone
        self._compare = compare
        self._on_disagreement = on_disagreement
        self.share = share
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._earned = 0.0  # model seconds times share, since the last audit
        self._cost: Optional[float] = None  # seconds one lone call took (estimated from the calls seen)
        self._candidate: Optional[tuple] = None
        self.audits = 0
        self.disagreements = 0
        self.seconds = 0.0

    def spent(self, seconds: float, size: int) -> None:
        """A model call of ``size`` requests took ``seconds``: the audit earns its share of it."""
        if self.share <= 0:
            return
        with self._lock:
            self._earned += seconds * self.share
            if self._cost is None and size:
                self._cost = seconds / size

    def wants_candidate(self) -> bool:
        """Whether a micro-batch's part should be copied and offered now (cheap to ask)."""
        return self.share > 0 and self._candidate is None and self._cost is not None and self._earned >= self._cost

    def offer(self, items: list, parts: list) -> None:
        """A micro-batch of several was cut: keep one of its requests (chosen at random) to run alone."""
        if len(items) < 2 or not self.wants_candidate():
            return
        position = self._random.randrange(len(items))
        try:
            # A copy: postprocessing may change its part in place while the audit waits.
            held = (items[position], copy.deepcopy(parts[position]), len(items), position)
        except Exception:  # noqa: BLE001 - a part that cannot be copied is not audited; the batch stands
            log.debug("a part could not be copied for the audit", exc_info=True)
            return
        with self._lock:
            if self._candidate is None:
                self._candidate = held

    @property
    def due(self) -> bool:
        return self._candidate is not None

    def run(self) -> Optional[str]:
        """Run the candidate alone and compare; returns the difference found (None when they agree
        or nothing was due). Never raises: a lone call that fails is no evidence either way."""
        with self._lock:
            candidate, self._candidate = self._candidate, None
        if candidate is None:
            return None
        item, batched, size, position = candidate
        started = time.perf_counter()
        try:
            alone = self._run_alone(item)
            difference = self._compare(alone, batched, item)
        except Exception:  # noqa: BLE001 - e.g. out of memory while another call ran: no verdict
            log.debug("an audit's lone call failed; no verdict", exc_info=True)
            return None
        finally:
            seconds = time.perf_counter() - started
            with self._lock:
                self.audits += 1
                self.seconds += seconds
                self._earned = max(0.0, self._earned - seconds)
                self._cost = seconds
        if difference is None:
            return None
        with self._lock:
            self.disagreements += 1
        reason = (f"an audit ran a request of a micro-batch of {size} (position {position}) again alone, and its "
                  f"answers differ: {difference}")
        self._on_disagreement(reason)
        return difference
