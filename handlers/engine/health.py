"""The one owner of "this worker must be replaced". The parts that find a reason report it here
(the model call: the accelerator is broken; the engine: a model call is stuck past its batch's
deadline; the stage pool: every stage thread is held by a hung stage); the engine, the handler
and through it each server adapter ask :attr:`WorkerHealth.reason`. No part decides by itself.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Optional

STUCK_MODEL_CALL = "the model is stuck in a call that outlived its batch's deadline"


class WorkerHealth:
    """Why this worker cannot serve, or None. A broken accelerator is for good; a stuck model
    call lasts until it returns; a saturated pool until a hung stage ends. Thread-safe.

    Example::

        health = WorkerHealth()
        health.accelerator_broken("CUDA error: an illegal memory access was encountered")
        assert health.must_be_replaced
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accelerator: Optional[str] = None
        self._stuck_calls: set = set()
        self._pool: Optional[str] = None

    # -- reported -------------------------------------------------------------------------------

    def accelerator_broken(self, reason: str) -> None:
        """The accelerator cannot be used in this process any more; the first reason is kept."""
        with self._lock:
            if self._accelerator is None:
                self._accelerator = reason

    def model_call_stuck(self, call: Future) -> bool:
        """``call`` outlived its batch: unhealthy until it returns. True when newly reported."""
        with self._lock:
            if call in self._stuck_calls:
                return False
            self._stuck_calls.add(call)
        call.add_done_callback(self._model_call_returned)  # at once if it has returned meanwhile
        return True

    def pool_saturated(self, reason: Optional[str]) -> None:
        """Why every stage thread is held by a hung stage; None once the pool takes work again."""
        with self._lock:
            self._pool = reason

    # -- asked ----------------------------------------------------------------------------------

    @property
    def accelerator(self) -> Optional[str]:
        """Why the accelerator cannot be used any more, or None."""
        return self._accelerator

    @property
    def reason(self) -> Optional[str]:
        """Why this worker cannot serve now (the most lasting reason first), or None."""
        with self._lock:
            if self._accelerator is not None:
                return self._accelerator
            if self._stuck_calls:
                return STUCK_MODEL_CALL
            return self._pool

    @property
    def must_be_replaced(self) -> bool:
        """A server should replace a worker for which this stays True."""
        return self.reason is not None

    def _model_call_returned(self, call: Future) -> None:
        with self._lock:
            self._stuck_calls.discard(call)
