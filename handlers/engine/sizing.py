"""How big each micro-batch is: static, dynamic (from the batch and the pool) or adaptive (from
measured preprocessing and inference costs, updated online), or a strategy of the user's own,
registered by name (:func:`register_sizing`) and chosen with ``micro_batch_strategy``."""

from __future__ import annotations

import math
import threading
from typing import Callable, Optional, Protocol, Sequence


class MicroBatchSizing(Protocol):
    """What a sizing strategy does; the engine calls it from several threads.

    ``size_for(batch_size)`` → items per micro-batch for the batch about to run (None: the whole
    batch). ``observe(batch_size, preprocess_seconds, calls)`` after each batch, with the pool's
    summed preprocessing seconds and ``(micro-batch size, seconds)`` of each model call.
    """

    def size_for(self, batch_size: int) -> Optional[int]: ...

    def observe(self, batch_size: int, preprocess_seconds: float, calls: Sequence[tuple]) -> None: ...


# name -> factory(micro_batch_size, pool_size, shared_cores) -> MicroBatchSizing
SizingFactory = Callable[[Optional[int], int, bool], MicroBatchSizing]
_REGISTRY: dict = {}


def register_sizing(name: str, factory: SizingFactory) -> None:
    """Make ``micro_batch_strategy: <name>`` build ``factory(micro_batch_size, pool_size,
    shared_cores)`` (``shared_cores``: the model runs on the pool's CPU cores). Call it at import
    time of the handler file, before the settings are read.

    Example::

        register_sizing("halves", lambda size, pool, shared: DynamicSizing(2))
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a sizing strategy needs a name, got {name!r}")
    if not callable(factory):
        raise TypeError(f"the factory of sizing strategy {name!r} must be callable, got {factory!r}")
    _REGISTRY[name] = factory


def sizing_names() -> tuple:
    """The names ``micro_batch_strategy`` accepts."""
    return tuple(_REGISTRY)


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


class AdaptiveSizing:
    """Learns the per-item preprocessing time and the model's cost ``fixed + per_item × size``
    from every batch (exponentially weighted least squares), and picks the size with the
    shortest predicted makespan. ``shared_cores``: the model runs on the pool's CPU cores (no
    accelerator), so overlap buys nothing.

    Exploring: the first batch pays for lazy initialisation (cuDNN, allocators, caches) and
    teaches nothing; then the whole batch (never worse than not cutting it), then a quarter of
    it. Sizes far apart tell a fixed cost per call from a cost per item; two near ones, measured
    with noise, can make a GPU's flat cost look per-item and pin the choice at size 1. Every
    ``PROBE_EVERY`` batches it tries half, then double, its choice, so the fit follows changes
    and never rests on one size alone.
    """

    PROBE_EVERY = 32

    def __init__(self, pool_size: int, memory: float = 0.9, shared_cores: bool = False):
        self.pool_size = pool_size
        self.shared_cores = shared_cores
        self._lock = threading.Lock()
        self._memory = memory
        self._batches = 0  # batches sized so far
        self._observed = 0  # batches observed so far
        self._pre = None  # EWMA of seconds per preprocessed item (one thread's time)
        # Weighted sums for least squares of call seconds on micro-batch size.
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._sizes_seen: set = set()

    def size_for(self, batch_size: int) -> Optional[int]:
        with self._lock:
            model = self._cost_model()
            pre = self._pre
            self._batches += 1
            batch_number = self._batches
            quarter = max(1, batch_size // 4)
            explore_quarter = bool(self._sizes_seen) and quarter not in self._sizes_seen
        if pre is None or model is None:
            return quarter if explore_quarter else batch_size
        fixed, per_item = model
        best = best_micro_batch_size(batch_size, self.pool_size, pre, fixed, per_item, self.shared_cores)
        if batch_number % self.PROBE_EVERY == 0:
            return beside(best, batch_size, upward=(batch_number // self.PROBE_EVERY) % 2 == 0)
        return best

    def observe(self, batch_size: int, preprocess_seconds: float, calls: Sequence[tuple]) -> None:
        with self._lock:
            self._observed += 1
            if self._observed == 1:
                return  # the first batch's times are mostly lazy initialisation
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


def beside(size: int, batch_size: int, upward: bool) -> int:
    """Double (or halve) ``size`` within 1..batch_size; the other way where that is the same size."""
    up, down = min(batch_size, size * 2), max(1, size // 2)
    if upward:
        return up if up != size else down
    return down if down != size else up


def make_sizing(strategy: str, micro_batch_size: Optional[int], pool_size: int, shared_cores: bool = False):
    """The registered strategy ``strategy``, built for these settings."""
    return _REGISTRY[strategy](micro_batch_size, pool_size, shared_cores)


register_sizing("static", lambda size, pool, shared: StaticSizing(size))
register_sizing("dynamic", lambda size, pool, shared: DynamicSizing(pool))
register_sizing("adaptive", lambda size, pool, shared: AdaptiveSizing(pool, shared_cores=shared))
