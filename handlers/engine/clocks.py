"""Clocks of one batch: its deadline, the time spent per stage, and the moving cost per request
of a pool stage (which decides how many requests one pool task carries)."""

from __future__ import annotations

import threading
import time
from typing import Callable


class Deadline:
    """A point in time that every wait of one batch is bounded by."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self._clock = clock
        self._end = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - self._clock())

    def expired(self) -> bool:
        return self.remaining() <= 0.0


class StageTimes:
    """Seconds spent per stage in one batch, summed over requests (preprocess, postprocess, and
    ``queue``: waiting for a pool thread) or micro-batches (inference). Written from several
    threads, hence the lock."""

    STAGES = ("queue", "preprocess", "inference", "postprocess")

    def __init__(self):
        self._lock = threading.Lock()
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.calls: list = []  # (micro-batch size, seconds) of each model call
        self.answered_alone = 0  # requests given a model call of their own (no layout to cut by)

    @property
    def model_calls(self) -> int:
        return len(self.calls)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    def add_alone(self, count: int) -> None:
        with self._lock:
            self.answered_alone += count

    def add_call(self, size: int, seconds: float) -> None:
        with self._lock:
            self.seconds["inference"] += seconds
            self.calls.append((size, seconds))
