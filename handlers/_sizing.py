"""How big each micro-batch is: static, dynamic (from the batch and the pool) or adaptive (from
measured preprocessing and inference costs, updated online)."""

from __future__ import annotations

import math
import threading
from typing import Optional, Sequence

STRATEGIES = ("static", "dynamic", "adaptive")


class StaticSizing:
    """A fixed micro-batch size (``None``: the whole batch)."""

    def __init__(self, size: Optional[int]):
        self.size = size

    def size_for(self, batch_size: int) -> Optional[int]:
        return self.size

    def observe(self, batch_size: int, preprocess_seconds: float, calls: Sequence[tuple]) -> None:
        """Static sizing learns nothing."""


class DynamicSizing(StaticSizing):
    """As many micro-batches as pool threads (at least two, for overlap): the first one is
    ready after about one pool round, and the model gets the rest in equal parts."""

    def __init__(self, pool_size: int):
        super().__init__(None)
        self.pool_size = pool_size

    def size_for(self, batch_size: int) -> Optional[int]:
        return max(1, math.ceil(batch_size / max(2, self.pool_size)))


def predicted_batch_seconds(n: int, m: int, pool: int, per_item_pre: float, call_fixed: float,
                            call_per_item: float, shared_cores: bool = False) -> float:
    """Makespan of a batch of ``n`` in micro-batches of ``m``.

    With an accelerator: the longer of (all preprocessing, then the last micro-batch's
    inference) and (the first micro-batch's preprocessing, then every inference back to back).
    With the model on the same CPU cores as the pool (``shared_cores``), the stages compete for
    those cores rather than overlap: the work simply adds up.
    """
    count = math.ceil(n / m)
    preprocess_all = n * per_item_pre / pool
    all_calls = count * call_fixed + n * call_per_item
    if shared_cores:
        return preprocess_all + all_calls
    last_call = call_fixed + call_per_item * min(m, n - (count - 1) * m)
    first_ready = min(m, n) * per_item_pre / pool
    return max(preprocess_all + last_call, first_ready + all_calls)


def best_micro_batch_size(n: int, pool: int, per_item_pre: float, call_fixed: float, call_per_item: float,
                          shared_cores: bool = False) -> int:
    """The micro-batch size with the shortest predicted makespan (the larger one on a tie)."""
    best, best_time = n, math.inf
    for m in range(n, 0, -1):
        t = predicted_batch_seconds(n, m, pool, per_item_pre, call_fixed, call_per_item, shared_cores)
        if t < best_time * (1 - 1e-9):
            best, best_time = m, t
    return best


class AdaptiveSizing(DynamicSizing):
    """Learns the per-item preprocessing time and the model's cost ``fixed + per_item × size``
    from every batch (exponentially weighted least squares), and picks the size with the
    shortest predicted makespan. Starts, and explores, from the dynamic rule. ``shared_cores``:
    the model runs on the pool's CPU cores (no accelerator), so overlap buys nothing."""

    def __init__(self, pool_size: int, memory: float = 0.9, shared_cores: bool = False):
        super().__init__(pool_size)
        self.shared_cores = shared_cores
        self._lock = threading.Lock()
        self._memory = memory
        self._pre = None  # EWMA of seconds per preprocessed item (one thread's time)
        # Weighted sums for least squares of call seconds on micro-batch size.
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._sizes_seen: set = set()

    def size_for(self, batch_size: int) -> Optional[int]:
        with self._lock:
            model = self._cost_model()
            pre = self._pre
        if pre is None or model is None:
            guess = super().size_for(batch_size)
            # Explore: a second size makes the model's fixed cost identifiable.
            if self._sizes_seen and guess in self._sizes_seen and batch_size > 1:
                return max(1, guess // 2) if guess > 1 else min(batch_size, 2)
            return guess
        fixed, per_item = model
        return best_micro_batch_size(batch_size, self.pool_size, pre, fixed, per_item, self.shared_cores)

    def observe(self, batch_size: int, preprocess_seconds: float, calls: Sequence[tuple]) -> None:
        with self._lock:
            if batch_size:
                per_item = preprocess_seconds / batch_size
                self._pre = per_item if self._pre is None else self._memory * self._pre + (1 - self._memory) * per_item
            for size, seconds in calls:
                self._sizes_seen.add(size)
                self._w = self._memory * self._w + 1
                self._sx = self._memory * self._sx + size
                self._sy = self._memory * self._sy + seconds
                self._sxx = self._memory * self._sxx + size * size
                self._sxy = self._memory * self._sxy + size * seconds

    def _cost_model(self):
        if len(self._sizes_seen) < 2 or self._w == 0:
            return None
        variance = self._w * self._sxx - self._sx**2
        if variance <= 1e-12:
            return None
        per_item = max(0.0, (self._w * self._sxy - self._sx * self._sy) / variance)
        fixed = max(0.0, (self._sy - per_item * self._sx) / self._w)
        return fixed, per_item


def make_sizing(strategy: str, micro_batch_size: Optional[int], pool_size: int, shared_cores: bool = False):
    if strategy == "static":
        return StaticSizing(micro_batch_size)
    if strategy == "dynamic":
        return DynamicSizing(pool_size)
    return AdaptiveSizing(pool_size, shared_cores=shared_cores)
