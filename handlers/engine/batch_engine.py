"""The batching engine: parallel preprocessing, pipelined micro-batch inference and scatter
postprocessing for one batch of requests. Plain Python; it knows nothing of TorchServe or torch.

Life of a batch::

    pool:   pre(0) pre(1) pre(2) pre(3) pre(4) pre(5) ... post(0) post(1) ...
    model:               [infer mb0: 0,1,2]  [infer mb1: 3,4,5] ...
    caller: waits on mb0's items, hands mb0 to the model, waits on mb1's items, ...

Every request carries an :class:`Outcome` from stage to stage; every wait is bounded by the
batch deadline; the calling thread gets exactly one outcome per request, in request order.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import wait as settle
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from handlers.engine.clocks import Deadline, StageTimes
from handlers.engine.errors import (DeadlineExceeded, InternalError, RequestError, ServiceUnavailable, describe, postprocess_error,
                      preprocess_error)
from handlers.engine.model_call import ModelCall
from handlers.engine.outcome import Failure, Outcome, Success, attempt
from handlers.engine.pool import CallChunk, StagePool
from handlers.engine.settings import EngineSettings
from handlers.engine.sizing import make_sizing

log = logging.getLogger(__name__)

# A request still preprocessing at this share of the deadline is given up, so that its
# micro-batch mates keep the rest of the time for inference and postprocessing. Each
# micro-batch's postprocessing, and every request still to collect once a stuck stage is found
# (it may only have been queued behind it), gets this share of what is left.
PREPROCESS_SHARE_OF_DEADLINE = 0.5
# How many pool threads hung stages may hold at once, each replaced by a fresh thread: the
# bound on threads a worker grows (pool_size + this), and past it the worker asks to be replaced.
MAX_STUCK_PER_THREAD = 2
MIN_STUCK = 4

Preprocess = Callable[[Any], Any]
InferMicroBatch = Callable[[list], Sequence[Any]]
Postprocess = Callable[[Any, Any], Any]


def plan_micro_batches(batch_size: int, micro_batch_size: Optional[int]) -> list[range]:
    """Cut request positions ``0..batch_size-1`` into consecutive micro-batches.

    >>> plan_micro_batches(7, 3)
    [range(0, 3), range(3, 6), range(6, 7)]
    """
    step = micro_batch_size or max(batch_size, 1)
    return [range(start, min(start + step, batch_size)) for start in range(0, batch_size, step)]


@dataclass(frozen=True)
class BatchReport:
    """What happened to one batch: one outcome per request, in order, how it was cut into
    micro-batches, how many model calls that took (retries of failed micro-batches included),
    and the seconds spent per stage."""

    outcomes: list
    micro_batch_sizes: list
    model_calls: int = 0
    stage_seconds: dict = field(default_factory=dict)
    answered_alone: int = 0  # requests that got a model call of their own (no layout to cut by)


class BatchEngine:
    """Runs batches through ``preprocess`` → ``infer_micro_batch`` → ``postprocess``.

    Args:
        preprocess: ``request -> item``; runs on the pool, one request at a time.
        infer_micro_batch: a :class:`ModelCall` (which owns collate → infer → split and the
            retries around it), or a plain ``[item, ...] -> [output, ...]`` (one output per item,
            in order); runs on the model thread(s), one micro-batch at a time per model thread.
        postprocess: ``(output, item) -> response``; runs on the pool, one request at a time.
        settings: sizes and the deadline.
        inference_on_cpu: the model shares the CPU cores with the pool (no accelerator); the
            adaptive micro-batch sizing then stops expecting overlap to pay.
        size_hint: ``request -> number``, cheap, before preprocessing (e.g. a text's length):
            micro-batches are then cut from requests in that order, so that each one holds
            requests of like size (less padding). Answers still come back in request order.
        abandoned: ``request -> error or None``, cheap: the error for a request nobody waits
            for any more (its client's deadline passed); checked before its preprocessing and
            again before its micro-batch goes to the model, so that under overload no model time
            is spent on it.

    Per-request stages must be thread-safe: they run concurrently on the pool. The engine keeps
    no per-request state on itself, so :meth:`run` may be called from several threads.

    Example::

        with BatchEngine(parse, model_step, format_output, EngineSettings(micro_batch_size=4)) as engine:
            outcomes = engine.run(requests).outcomes
    """

    def __init__(
        self,
        preprocess: Preprocess,
        infer_micro_batch: "ModelCall | InferMicroBatch",
        postprocess: Postprocess,
        settings: EngineSettings = EngineSettings(),
        inference_on_cpu: bool = False,
        size_hint: Optional[Callable[[Any], float]] = None,
        abandoned: Optional[Callable[[Any], Optional[RequestError]]] = None,
    ):
        self.settings = settings
        self._preprocess = preprocess
        self._model_call = infer_micro_batch if isinstance(infer_micro_batch, ModelCall) else ModelCall(infer_micro_batch)
        self._postprocess = postprocess
        self._size_hint = size_hint
        self._abandoned = abandoned
        self._sizing = make_sizing(
            settings.micro_batch_strategy, settings.micro_batch_size, settings.pool_size, shared_cores=inference_on_cpu
        )
        # The model call, the pool and this engine report to one owner of "replace this worker".
        self._health = self._model_call.health
        # Created once: threads are reused across batches, never started per request. Up to
        # MAX_STUCK_PER_THREAD × pool_size threads (at least MIN_STUCK) held by hung stages are
        # replaced; past that the engine is unhealthy.
        self._pool = StagePool(settings.pool_size, max_stuck=max(MIN_STUCK, MAX_STUCK_PER_THREAD * settings.pool_size),
                               health=self._health)
        self._model = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="microbatch-model")
        self._flight_lock = threading.Lock()
        self._batches_in_flight = 0

    # -- public -------------------------------------------------------------------------------

    def run(self, requests: Sequence[Any]) -> BatchReport:
        """Process one batch; returns exactly one outcome per request, in request order.

        Never raises and never waits past ``settings.deadline_s``: a request whose stage is
        unfinished at the deadline gets a :class:`DeadlineExceeded` failure. While the engine is
        unhealthy (see :attr:`unhealthy_reason`) every request gets a 503 at once.
        """
        times = StageTimes()
        deadline = Deadline(self.settings.deadline_s)
        outcomes: list[Optional[Outcome]] = [None] * len(requests)
        plan: list = []
        with self._flight_lock:
            self._batches_in_flight += 1
        try:
            return self._run(requests, times, deadline, outcomes, plan)
        finally:
            self._audit_when_idle()

    def _run(self, requests, times, deadline, outcomes, plan) -> BatchReport:
        try:
            reason = self.unhealthy_reason
            if reason is not None:
                refused = Failure(ServiceUnavailable(f"this worker cannot serve now: {reason}"))
                return self._report([refused] * len(requests), plan, times, requests)
            awaited = self._drop_abandoned(requests, range(len(requests)), outcomes)
            plan = self._plan(requests, awaited)
            self._run_pipeline(requests, plan, deadline, outcomes, times)
        except Exception as exc:  # noqa: BLE001 - an engine bug must still answer every request
            # (hooks' errors never get here: each is caught, BaseExceptions too, by its request)
            log.exception("batch of %d failed inside the engine", len(requests))
            error = InternalError(f"the handler failed on this batch: {describe(exc)}")
            outcomes = [outcome or Failure(error) for outcome in outcomes]
        try:
            self._sizing.observe(len(requests), times.seconds["preprocess"], list(times.calls))
        except BaseException:  # noqa: BLE001 - sizing is advice (a strategy of the user's); the answers stand
            log.exception("the micro-batch sizing strategy failed to learn from a batch")
        return self._report(outcomes, plan, times, requests)

    def _audit_when_idle(self) -> None:
        """The last batch in flight is answered: the model may run the audit's lone call (it
        queues behind any micro-batch that arrives meanwhile, at most one call's delay)."""
        with self._flight_lock:
            self._batches_in_flight -= 1
            idle = self._batches_in_flight == 0
        audit = self._model_call.audit
        try:
            if idle and audit is not None and audit.due and self.unhealthy_reason is None:
                self._model.submit(self._model_call.run_audit)
        except Exception:  # noqa: BLE001 - the engine is closing, or the audit is broken: the answers stand
            log.debug("could not queue the audit", exc_info=True)

    @property
    def safe_micro_batch_size(self) -> Optional[int]:
        """The largest micro-batch known to fit in memory, once the model ran out of it (else None)."""
        return self._model_call.safe_size

    @property
    def unhealthy_reason(self) -> Optional[str]:
        """Why this engine cannot serve (a model call hung past its deadline and still running,
        every pool thread held by hung stages, or an accelerator left broken by a model call); None
        when it can. A server should replace a worker whose engine stays unhealthy (the
        :class:`~handlers.engine.health.WorkerHealth` the model call and the pool report to decides)."""
        return self._health.reason

    @property
    def healthy(self) -> bool:
        return self.unhealthy_reason is None

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the pool and the model thread(s); idempotent.

        Returns True when every thread ended within ``timeout`` seconds; False when a hung stage
        still holds one (they are named in the log; threads cannot be killed).
        """
        end = time.monotonic() + timeout
        self._model.shutdown(wait=False, cancel_futures=True)
        lingering = self._pool.close(timeout)
        for thread in self._model_threads():
            thread.join(max(0.0, end - time.monotonic()))
        lingering += [t.name for t in self._model_threads() if t.is_alive()]
        if lingering:
            log.warning("engine threads still busy after close(), held by hung stages: %s", ", ".join(lingering))
            return False
        return True

    def __enter__(self) -> "BatchEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- pipeline -----------------------------------------------------------------------------

    def _report(self, outcomes: list, plan: list, times: StageTimes, requests: Sequence[Any] = ()) -> BatchReport:
        try:
            log_errors(outcomes, requests)
        except Exception:  # noqa: BLE001 - a logging failure must not cost the batch its answers
            log.exception("could not log the server errors of a batch")
        return BatchReport(
            outcomes=outcomes,
            micro_batch_sizes=[len(r) for r in plan],
            model_calls=times.model_calls,
            stage_seconds=dict(times.seconds),
            answered_alone=times.answered_alone,
        )

    def _plan(self, requests: Sequence[Any], positions: list) -> list:
        """The requests at ``positions`` cut into micro-batches: consecutive, or grouped by size hint."""
        ranges = plan_micro_batches(len(positions), self._micro_batch_size(len(positions)))
        if self._size_hint is not None and len(ranges) >= 2:
            positions = sorted(positions, key=lambda position: self._hint(requests[position]))
        return [[positions[i] for i in r] for r in ranges]

    def _drop_abandoned(self, requests: Sequence[Any], positions, outcomes: list) -> list:
        """The positions whose requests are still awaited; the others get their error now."""
        if self._abandoned is None:
            return list(positions)
        awaited = []
        for position in positions:
            try:
                error = self._abandoned(requests[position])
            except Exception:  # noqa: BLE001 - a broken check must not cost the request its answer
                log.exception("could not tell whether request #%d is still awaited", position)
                error = None
            if error is None:
                awaited.append(position)
            else:
                outcomes[position] = Failure(error)
        return awaited

    def _hint(self, request: Any) -> float:
        try:
            return float(self._size_hint(request))
        except BaseException:  # noqa: BLE001 - a hint is advice: a bad request is judged by preprocessing
            return 0.0

    def _micro_batch_size(self, batch_size: int) -> Optional[int]:
        try:
            size = self._sizing.size_for(batch_size)
        except BaseException as exc:  # noqa: BLE001 - a strategy's SystemExit must not escape run()
            raise RuntimeError(f"the micro-batch sizing strategy failed: {describe(exc)}") from None
        return self._model_call.cap(size)

    def _run_pipeline(self, requests, plan, deadline, outcomes, times) -> None:
        # Queue every micro-batch's preprocessing at once (in order), so that the pool works
        # ahead while the model runs: inference of micro-batch k overlaps preprocessing of k+1.
        preprocessing = [
            [(list(positions), self._submit_chunk("preprocess", self._preprocess, preprocess_error,
                                                  [(requests[p],) for p in positions], times))]
            for positions in plan
        ]
        preprocess_deadline = Deadline(deadline.remaining() * PREPROCESS_SHARE_OF_DEADLINE)

        def after_a_stuck_stage() -> Deadline:
            return Deadline(deadline.remaining() * PREPROCESS_SHARE_OF_DEADLINE)

        on_model: list[tuple[list[int], Future]] = []
        for parts in preprocessing:
            ready = []
            self._settle(parts, preprocess_deadline)
            for part, calls in parts:
                collected, preprocess_deadline = self._collect(
                    part, calls, preprocess_deadline, "preprocessing", after_a_stuck_stage
                )
                for position, outcome in collected:
                    if outcome.ok:
                        ready.append((position, outcome.value))
                    else:
                        outcomes[position] = outcome
            if not ready:
                continue
            if deadline.expired():
                late = self._late("inference", deadline)
                for position, _ in ready:
                    outcomes[position] = late
                continue
            job = self._model.submit(self._infer_then_postprocess, ready, deadline, times, requests)
            on_model.append(([position for position, _ in ready], job))

        for positions, job in on_model:
            scattered = self._wait(job, deadline, "inference")
            if not scattered.ok:
                if job.running():
                    self._note_stuck_model_call(job)
                for position in positions:
                    outcomes[position] = scattered
                continue
            failed, postprocessing = scattered.value
            for position, failure in failed:
                outcomes[position] = failure
            # Each micro-batch's postprocessing gets the same share of what is left, so that a
            # hung one is found (and its thread replaced) while the others still have time.
            postprocess_deadline = after_a_stuck_stage()
            self._settle(postprocessing, postprocess_deadline)
            for part, calls in postprocessing:
                collected, postprocess_deadline = self._collect(
                    part, calls, postprocess_deadline, "postprocessing", after_a_stuck_stage
                )
                for position, outcome in collected:
                    outcomes[position] = outcome

    def _infer_then_postprocess(self, ready: list, deadline: Deadline, times: StageTimes, requests) -> Outcome:
        """On the model thread: infer one micro-batch, then queue its outputs' postprocessing on
        the pool. Returns ``Success(([(position, Failure)], [(positions, CallChunk)]))``."""
        items = dict(ready)
        # Checked again as the model takes the micro-batch: a request may have been given up
        # while the micro-batches ahead of it ran.
        dropped: list = [None] * len(requests)
        awaited = set(self._drop_abandoned(requests, [position for position, _ in ready], dropped))
        failed = [(position, dropped[position]) for position, _ in ready if position not in awaited]
        succeeded = []
        ready = [(position, item) for position, item in ready if position in awaited]
        for position, outcome in self._model_call.run(ready, deadline, times) if ready else ():
            (succeeded if outcome.ok else failed).append((position, outcome))
        outputs = dict((position, outcome.value) for position, outcome in succeeded)
        positions = [position for position, _ in succeeded]
        arguments = lambda part: [(outputs[p], items[p]) for p in part]  # noqa: E731
        # Never on the model thread, however cheap: a postprocessing call that hangs there would
        # hold the model, and so every later micro-batch, hostage.
        postprocessing = [(positions, self._submit_chunk("postprocess", self._postprocess, postprocess_error,
                                                         arguments(positions), times))] if positions else []
        return Success((failed, postprocessing))

    def _submit_chunk(self, stage, function, classify, argument_lists, times) -> CallChunk:
        """One stage for a micro-batch's requests, one call per request, each with its own
        outcome: the pool threads take the calls one at a time from one shared chunk (balanced,
        and a hung call holds only its thread), and the hand-off to a thread is paid once per
        thread, not once per request."""
        calls = CallChunk(lambda *args: attempt(function, classify, *args), argument_lists)
        queued_at = time.perf_counter()
        for _ in range(min(self._pool.size, len(argument_lists))):
            self._pool.submit(self._run_chunk, calls, stage, times, queued_at)
        return calls

    @staticmethod
    def _run_chunk(calls: CallChunk, stage, times, queued_at) -> None:
        """On a pool thread: calls of one stage until the chunk has none left to start."""
        started = time.perf_counter()
        times.add("queue", started - queued_at)
        if calls.run():
            times.add(stage, time.perf_counter() - started)

    @staticmethod
    def _settle(parts: list, deadline: Deadline) -> None:
        """Wait until every call of ``parts`` is done, or ``deadline``: one wake-up of this
        (the server's main) thread for the micro-batch, not one per request. What is late is
        found by :meth:`_collect` after."""
        futures = [future for _, calls in parts for future in calls.futures]
        if len(futures) > 1:
            settle(futures, timeout=max(0.0, deadline.remaining()))

    def _collect(self, part: list, calls: CallChunk, deadline: Deadline, stage: str,
                 after_a_stuck_stage: Optional[Callable[[], Deadline]] = None) -> tuple:
        """``([(position, outcome)], deadline)`` for one chunk. A call running past ``deadline``
        is late, and its thread reported stuck: the pool replaces it, the chunk's calls not yet
        started go to another thread, and the calls still to collect get ``after_a_stuck_stage()``
        (they may only have been queued behind it)."""
        collected = []
        for position, future in zip(part, calls.futures):
            outcome = self._wait(future, deadline, stage)
            if not outcome.ok and isinstance(outcome.error, DeadlineExceeded) and future.running():
                # The chunk's calls not yet started go first to the replacement thread, not
                # behind the later micro-batches' work in the queue.
                rest = calls.run if calls.has_unstarted else None
                if not self._pool.mark_stuck(calls.thread_of(future), first=rest) and rest is not None:
                    self._pool.submit(rest)
                if after_a_stuck_stage is not None:
                    deadline = after_a_stuck_stage()
            collected.append((position, outcome))
        return collected, deadline
    # -- helpers ------------------------------------------------------------------------------

    def _note_stuck_model_call(self, job: Future) -> None:
        """A model call outlived its batch: the engine is unhealthy until it returns."""
        if self._health.model_call_stuck(job):
            log.error("a model call is still running past its batch's deadline: this worker answers 503 "
                      "until it returns, and should be replaced")

    def _model_threads(self) -> list:
        return list(getattr(self._model, "_threads", ()))

    def _wait(self, future: Future, deadline: Deadline, stage: str) -> Outcome:
        try:
            return future.result(timeout=deadline.remaining())
        except FutureTimeout:
            future.cancel()  # drops it if it has not started; a running stage is left to finish
            return self._late(stage, deadline)
        except CancelledError:
            return Failure(InternalError(f"{stage} was cancelled: the handler is shutting down"))
        except BaseException as exc:  # noqa: BLE001 - e.g. the pool was closed under a running batch
            return Failure(InternalError(f"{stage} failed inside the handler: {describe(exc)}"))

    @staticmethod
    def _late(stage: str, deadline: Deadline) -> Failure:
        return Failure(
            DeadlineExceeded(
                f"{stage} did not finish within {deadline.seconds:.3g} s (the handler's deadline_s bounds each batch)"
            )
        )


def log_errors(outcomes: Sequence[Outcome], requests: Sequence[Any] = ()) -> None:
    """Log each error of a batch once, naming its requests by id (``request.id`` where the
    server gave one, else the position): a 5xx at ERROR with the traceback that caused it (a bug
    of the handler or the model: its log is where it gets fixed), a 4xx (the client's) and a 503
    (the server refusing) at DEBUG."""
    errors: dict = {}
    for position, outcome in enumerate(outcomes):
        if outcome is not None and not outcome.ok:
            request = requests[position] if position < len(requests) else None
            name = getattr(request, "id", None) or f"#{position}"
            errors.setdefault(id(outcome.error), (outcome.error, []))[1].append(name)
    for error, names in errors.values():
        # A 503 is the server refusing (its budget passed, a broken worker already logged why): no bug.
        level = logging.ERROR if error.status >= 500 and error.status != 503 else logging.DEBUG
        if not log.isEnabledFor(level):
            continue
        traceback = f"\n{error.traceback_text}" if error.traceback_text else ""
        log.log(level, "request %s (of a batch of %d): %d %s: %s%s", ", ".join(names), len(outcomes), error.status,
                error.kind, error.message, traceback)
