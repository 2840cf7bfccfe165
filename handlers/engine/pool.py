"""The thread pool of the per-request stages: a fixed number of threads that keeps serving when a
stage hangs, without growing threads without bound.

A stage still running past its batch's deadline holds its thread (Python threads cannot be
killed). The engine reports such a thread with :meth:`StagePool.mark_stuck`; the pool then starts
a replacement, so that ``size`` threads keep taking work, and the stuck one ends when its stage
returns. At most ``max_stuck`` threads are held so at once: past that no replacement is started,
and while stuck threads leave fewer than ``size`` taking work the pool reports it to the worker's
:class:`~handlers.engine.health.WorkerHealth` (the worker should be replaced).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Optional, Sequence

from handlers.engine.health import WorkerHealth

log = logging.getLogger(__name__)

_STOP = None  # the sentinel that ends one pool thread


class StagePool:
    """``size`` threads running submitted calls; see the module docstring for stuck threads.

    Args:
        size: threads that take work.
        max_stuck: threads that may be held by hung stages at once, each replaced.
        name: thread name prefix.
        health: told when the pool is saturated, and when it is no longer.
    """

    def __init__(self, size: int, max_stuck: int, name: str = "microbatch-pool",
                 health: Optional[WorkerHealth] = None):
        self.size = size
        self.max_stuck = max_stuck
        self._name = name
        self._health = health
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set = set()  # every live thread of the pool
        self._stuck: set = set()  # threads held past a deadline
        self._replaced: set = set()  # stuck threads that got a replacement: they end when free
        self._closed = False
        self._started = 0
        for _ in range(size):
            self._start_thread()

    # -- public -------------------------------------------------------------------------------

    def submit(self, function: Callable[..., Any], *args) -> Future:
        """Queue ``function(*args)``; its Future holds the result or the exception."""
        future: Future = Future()
        if self._closed:
            raise RuntimeError("the pool is closed")
        self._tasks.put((future, function, args))
        return future

    def mark_stuck(self, thread: Optional[threading.Thread], first: Optional[Callable[[], Any]] = None) -> bool:
        """``thread`` runs a stage past its deadline: replace it while fewer than ``max_stuck``
        threads are stuck. Idempotent; a thread that is no longer stuck is ignored.

        ``first``: work the replacement does before any queued task (the calls that were
        waiting behind the hung one, which must not wait behind later batches' work too).
        Returns True when a replacement took it."""
        with self._lock:
            if thread is None or thread not in self._threads or thread in self._stuck or self._closed:
                return False
            self._stuck.add(thread)
            if len(self._replaced) >= self.max_stuck:
                self._report_saturation()
                log.error(
                    "%d stage threads are stuck past their deadline; no more replacements (the worker "
                    "should be restarted)", len(self._stuck),
                )
                return False
            self._replaced.add(thread)
            self._start_thread(first)
            self._report_saturation()
        log.warning("a stage is stuck past its deadline on %s: started a replacement thread", thread.name)
        return first is not None

    @property
    def saturated(self) -> bool:
        """True when stuck threads leave fewer than ``size`` threads taking work."""
        with self._lock:
            return self._saturated()

    @property
    def stuck_threads(self) -> list:
        """Names of the threads held past a deadline right now."""
        with self._lock:
            return sorted(t.name for t in self._stuck)

    def close(self, timeout: float) -> list:
        """Stop taking work, cancel what has not started, wait up to ``timeout`` seconds for the
        threads to end; idempotent. Returns the names of those still alive (held by hung stages)."""
        with self._lock:
            first = not self._closed
            self._closed = True
            threads = list(self._threads)
        if first:
            while True:
                try:
                    task = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if task is not _STOP:
                    task[0].cancel()
            for _ in threads:
                self._tasks.put(_STOP)
        end = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))
        return sorted(t.name for t in threads if t.is_alive())

    # -- internals ----------------------------------------------------------------------------

    def _saturated(self) -> bool:  # with the lock held
        return bool(self._stuck) and len(self._threads) - len(self._stuck) < self.size

    def _report_saturation(self) -> None:
        """Tell the health owner what the pool's state is now; with the lock held, so that
        reports arrive in the order of the changes."""
        if self._health is None:
            return
        if self._saturated():
            names = ", ".join(sorted(t.name for t in self._stuck))
            self._health.pool_saturated(f"every stage thread is held by a hung stage ({names})")
        else:
            self._health.pool_saturated(None)

    def _start_thread(self, first: Optional[Callable[[], Any]] = None) -> None:
        self._started += 1
        thread = threading.Thread(target=self._work, args=(first,), name=f"{self._name}-{self._started}", daemon=True)
        self._threads.add(thread)
        thread.start()

    def _work(self, first: Optional[Callable[[], Any]] = None) -> None:
        me = threading.current_thread()
        try:
            if first is not None:
                try:
                    first()
                except BaseException:  # noqa: BLE001 - a call chunk keeps its calls' errors itself
                    log.exception("work handed to a replacement thread failed")
            while True:
                task = self._tasks.get()
                if task is _STOP:
                    return
                future, function, args = task
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    result = function(*args)
                except BaseException as exc:  # noqa: BLE001 - delivered to the caller, never lost
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                with self._lock:
                    if me in self._stuck:  # freed: the pool may take work again
                        self._stuck.discard(me)
                        self._report_saturation()
                    if me in self._replaced:
                        self._replaced.discard(me)
                        return  # its replacement serves in its place
        finally:
            with self._lock:
                self._threads.discard(me)
                self._stuck.discard(me)
                self._replaced.discard(me)
                self._report_saturation()


class CallChunk:
    """Calls of one function, each with its own Future, that pool tasks take one at a time:
    several threads may run one chunk (each call is taken once), so the hand-off to a thread is
    paid once per thread, not per call.

    When one call hangs, the calls after it may not have started: :meth:`run` may be submitted
    again, and another thread then takes the rest, so that they do not wait behind it.
    """

    def __init__(self, function: Callable[..., Any], argument_lists: Sequence[tuple]):
        self.futures = [Future() for _ in argument_lists]
        self._function = function
        self._work = deque(zip(self.futures, argument_lists))
        self._running: dict = {}  # future -> the thread running its call

    def run(self) -> int:
        """Run calls until none is left to start (several threads may run one chunk); returns
        how many this thread ran."""
        ran = 0
        while True:
            try:
                future, args = self._work.popleft()  # atomic: each call is taken once
            except IndexError:
                return ran
            if not future.set_running_or_notify_cancel():
                continue
            self._running[future] = threading.current_thread()
            ran += 1
            try:
                future.set_result(self._function(*args))
            except BaseException as exc:  # noqa: BLE001 - delivered to the caller, never lost
                future.set_exception(exc)
            finally:
                self._running.pop(future, None)

    def thread_of(self, future: Future) -> Optional[threading.Thread]:
        """The thread running ``future``'s call now, or None."""
        return self._running.get(future)

    @property
    def has_unstarted(self) -> bool:
        return bool(self._work)
