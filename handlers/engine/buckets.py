"""Fixed micro-batch sizes ("buckets") for a model compiled per size.

A compiled graph (torch.compile with ``dynamic=False``, an AOTInductor package, a CUDA graph) is
specialised to one batch size: any other size runs eager or compiles again. The model call asks
:class:`Buckets` two things: the micro-batch size to use (the sizing strategy's choice, after the
out-of-memory cap, brought down to a bucket) and the size to pad a short micro-batch up to. It
pads only while ``may_pad()`` says the model is proven batch-invariant (the start-up self-test),
so that the pad rows cannot change the real rows' answers; their outputs are then dropped.

Plain Python: no torch.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence


class Buckets:
    """The sizes a compiled model runs at (none: every size runs as it comes).

    Example::

        buckets = Buckets([4, 8], may_pad=lambda: True)
        buckets.micro_batch_size(11)  # 8: the largest bucket that is not larger
        buckets.padded(3)  # 4: the smallest bucket that holds 3
        buckets.padded(1)  # 1: it would fill a quarter of 4
    """

    def __init__(self, sizes: Sequence[int] = (), may_pad: Callable[[], bool] = lambda: False,
                 min_fill: float = 0.5):
        self.sizes = tuple(sorted(set(sizes)))
        self._may_pad = may_pad
        self.min_fill = min_fill  # pad only a micro-batch that fills this share of its bucket

    def __bool__(self) -> bool:
        return bool(self.sizes)

    def micro_batch_size(self, size: Optional[int]) -> Optional[int]:
        """``size`` (None: the whole batch) brought down to the largest bucket not above it; a
        size below every bucket stays as it is (it runs eager, or is padded)."""
        if not self.sizes:
            return size
        if size is None:
            return self.sizes[-1]
        below = [bucket for bucket in self.sizes if bucket <= size]
        return below[-1] if below else size

    def padded(self, count: int, limit: Optional[int] = None) -> int:
        """The size to run ``count`` items at: the smallest bucket that holds them and is not
        above ``limit`` (the out-of-memory cap), when padding is allowed and ``count`` fills at
        least ``min_fill`` of it (the pad rows are work too); else ``count``."""
        if count in self.sizes or not self.sizes or not self._may_pad():
            return count
        bucket = next((b for b in self.sizes if b >= count), None)
        if bucket is None or (limit is not None and bucket > limit) or count < self.min_fill * bucket:
            return count
        return bucket
