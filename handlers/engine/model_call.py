"""The model call: one micro-batch through the model (collate → infer → split), and every policy
around it, owned here so that the engine only schedules:

- **retry by splitting**: a failed micro-batch is cut in halves and each retried, so that a
  poison request fails alone; not when splitting cannot cure it (a split failure: the output's
  layout is the same at any size; an accelerator left broken). Two halves failing alike do not
  stop it: a micro-batch may hold two poison requests, one in each half, and a request is never
  failed for a batch-mate's error;
- **out of memory**: a call that ran out of memory while another model thread's call ran beside
  it is first retried alone (the model calls made exclusive for it), so that one thread's
  micro-batch does not cap or split the other's; the micro-batch size is capped when the size
  caused it (every part fitted after the split), and the cap is probed now and then and lifted
  when a full size fits again; the failed attempt is freed before the halves run (its traceback
  kept as text, not frames);
- **a broken accelerator** (a device-side assert leaves the CUDA context unusable): no retry,
  and the model call reports itself unhealthy at once, so that the server replaces the worker;
- **a batch layout to learn**: when the split asks for evidence (:class:`LayoutUnknown`), the
  model is called once more at another size (the first half; a lone request twice over) and the
  layout learned from both sizes, with a third size when two leave it ambiguous; and on inputs
  derived from the micro-batch's own (``derive``: blank, noise) at its size, so that a size set
  by the data is not taken for the batch. A lone request whose probe runs out of memory is
  answered by its own call, whole, as if answered alone (the layout stays unknown);
- **answering alone**: where no layout can be trusted (:class:`AnswerAlone`), each request gets
  a model call of its own, whose whole output is its answer; each such call fails alone too;
- **buckets** (a model compiled at fixed sizes, :class:`Buckets`): the micro-batch size, once
  capped, is brought down to a bucket, and a short micro-batch is padded up to one (with copies
  of its last request, while the model is proven batch-invariant) and the pad rows' outputs
  dropped. Padding never goes above the out-of-memory cap, and the parts of a failed micro-batch
  are retried unpadded, so that a retry is never as large as what failed.

Plain Python: the model's steps come in as functions; it imports neither torch nor a server.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Optional, Sequence

from handlers.engine.audit import Audit
from handlers.engine.buckets import Buckets
from handlers.engine.clocks import Deadline, StageTimes
from handlers.engine.errors import (DeadlineExceeded, InferenceFailed, OutOfMemory, RequestError, ServiceUnavailable, SplitFailed,
                      inference_error, is_out_of_memory)
from handlers.engine.health import WorkerHealth
from handlers.engine.outcome import Failure, Outcome, Success, attempt
from handlers.engine.scatter import AnswerAlone, LayoutAmbiguous, LayoutUnknown

log = logging.getLogger(__name__)

# Once out of memory capped the micro-batch size, every this many batches one runs uncapped:
# memory freed since (another model unloaded, fragmentation gone) lifts the cap.
PROBE_CAPPED_SIZE_EVERY = 16
# The longest a model call waits to run alone (for a retry after out of memory) or beside one that
# runs alone; past it, it runs anyway: the wait must not outlast a stuck call on another thread.
EXCLUSIVE_WAIT_S = 60.0

Forward = Callable[[list], Any]  # items of one micro-batch -> the model's output for them
Split = Callable[[Any, int], Sequence[Any]]  # (output, count) -> one output per item


def never(exc: BaseException) -> bool:
    return False


class ModelCall:
    """Calls the model on micro-batches and gives each request its own outcome.

    Args:
        forward: ``items -> output`` for one micro-batch (collate + infer); runs on a model thread.
        split: ``(output, count) -> [output, ...]``; None when ``forward`` already returns one
            output per item. It may raise :class:`LayoutUnknown` to have the model probed.
        breaks_device: ``exc -> bool``: the error left the accelerator unusable (sticky CUDA
            errors); the model call reports it to ``health`` and refuses every call after.
        health: the worker's :class:`WorkerHealth` (a new one when None).
        derive: ``items -> [items, ...]``: inputs derived from a micro-batch's (same count, other
            data) for a probe; none when the items cannot be varied (the evidence is then thin).
        answers_alone: ``() -> bool``: the split can no longer cut a micro-batch of several;
            each request is then sent alone, without a wasted call on them all first.
        audit: offered a request of each micro-batch of several now and then, to run alone on
            idle model time (:meth:`run_audit`) and compare.
        buckets: the fixed sizes the model is compiled at (:class:`Buckets`; none by default).

    Example::

        call = ModelCall(lambda items: [2 * x for x in items])
        outcomes = call.run([(0, 1.0), (1, 2.0)], Deadline(5), StageTimes())
    """

    def __init__(self, forward: Forward, split: Optional[Split] = None, breaks_device: Callable = never,
                 health: Optional[WorkerHealth] = None, derive: Callable[[list], list] = lambda items: [],
                 answers_alone: Callable[[], bool] = lambda: False, audit: Optional[Audit] = None,
                 buckets: Buckets = Buckets()):
        self._forward = forward
        self.buckets = buckets
        self.audit = audit
        self._split = split
        self._breaks_device = breaks_device
        self._derive = derive
        self._answers_alone = answers_alone
        self.answered_alone = 0  # requests that got a model call of their own (no layout to cut by)
        self._lock = threading.Lock()
        self.health = health or WorkerHealth()
        self._safe_size: Optional[int] = None
        self._smallest_oom: Optional[int] = None
        self._sizes_that_fit: set = set()
        self._capped_batches = 0
        self._gate = _Gate()

    # -- public -------------------------------------------------------------------------------

    def run(self, ready: list, deadline: Deadline, times: StageTimes) -> list:
        """``[(position, item)]`` of one micro-batch → ``[(position, outcome)]``, every position
        once; never raises."""
        if self._broken is not None:
            refused = Failure(_unavailable(self._broken))
            return [(position, refused) for position, _ in ready]
        return self._isolate(ready, deadline, times, self._call(ready, times, pad=True), top=True)

    def cap(self, size: Optional[int]) -> Optional[int]:
        """The micro-batch size to use instead of ``size`` (None: the whole batch): capped while
        out of memory caps it (every :data:`PROBE_CAPPED_SIZE_EVERY` capped batches, ``size``
        itself), then brought down to a bucket, if the model has buckets."""
        return self.buckets.micro_batch_size(self._capped(size))

    def _capped(self, size: Optional[int]) -> Optional[int]:
        with self._lock:
            safe = self._safe_size
            if safe is None or (size is not None and size <= safe):
                return size
            self._capped_batches += 1
            if self._capped_batches % PROBE_CAPPED_SIZE_EVERY == 0:
                return size  # a probe: if it fits now, the cap is lifted
            return safe

    @property
    def safe_size(self) -> Optional[int]:
        """The largest micro-batch known to fit in memory, once the model ran out of it (else None)."""
        return self._safe_size

    @property
    def unhealthy_reason(self) -> Optional[str]:
        """Why this model cannot be called any more (the accelerator is broken), or None."""
        return self._broken

    @property
    def _broken(self) -> Optional[str]:
        return self.health.accelerator

    # -- isolation ------------------------------------------------------------------------------

    def _isolate(self, ready: list, deadline: Deadline, times: StageTimes, outcome: Optional[Outcome],
                 top: bool = False) -> list:
        """Outcomes for ``ready``; ``outcome`` is that of a call already made on exactly these items."""
        if outcome is None:
            outcome = self._call(ready, times)
        if outcome.ok:
            self._remember_fit(len(ready))
            # Answered alone, each request has its own outcome (a Failure of its own lone call).
            return [(position, output if isinstance(output, Failure) else Success(output))
                    for (position, _), output in zip(ready, outcome.value)]
        error = outcome.error
        if len(ready) == 1 or not self._splitting_may_cure(error):
            return [(position, outcome) for position, _ in ready]
        if deadline.expired():
            late = Failure(DeadlineExceeded(f"inference did not finish within {deadline.seconds:.3g} s (the "
                                            f"handler's deadline_s bounds each batch)"))
            return [(position, late) for position, _ in ready]
        if top:
            log.warning("inference failed on a micro-batch of %d (%s); retrying its parts to isolate the cause",
                        len(ready), error.message)
        middle = len(ready) // 2
        left, right = ready[:middle], ready[middle:]
        left_outcome = self._call(left, times)
        right_outcome = self._call(right, times) if self._broken is None else None
        if right_outcome is None:  # the left half broke the device: nothing more may run
            return self._isolate(left, deadline, times, left_outcome) + self.run(right, deadline, times)
        results = (self._isolate(left, deadline, times, left_outcome)
                   + self._isolate(right, deadline, times, right_outcome))
        out_of_memory_alone = any(not o.ok and isinstance(o.error, OutOfMemory) for _, o in results)
        if isinstance(error, OutOfMemory) and not out_of_memory_alone:
            self._remember_out_of_memory(len(ready))
        return results

    def _splitting_may_cure(self, error: RequestError) -> bool:
        if self._broken is not None or isinstance(error, (SplitFailed, DeadlineExceeded)):
            return False
        return error.retry_may_cure

    def _call(self, ready: list, times: StageTimes, pad: bool = False) -> Outcome:
        """One model call on ``ready``'s items (plus a probe of its first half, if the split asks
        for one), padded up to a bucket when ``pad``; the outcome holds one output per item."""
        items = [item for _, item in ready]
        if self._broken is not None:
            return Failure(_unavailable(self._broken))
        if len(items) > 1 and self._answers_alone():
            return Success(self._each_alone(items, times))
        started = time.perf_counter()
        try:
            self._gate.overlapped = False
            size = self.buckets.padded(len(items), self._safe_size) if pad else len(items)
            outcome = attempt(self._outputs, self._classify, items, times, size)
            if not outcome.ok and isinstance(outcome.error, OutOfMemory) and self._gate.overlapped:
                # Another thread's micro-batch ran beside it: the same one again, alone, before
                # splitting it or capping the size for a memory use that was not its own.
                with self._gate.exclusive():
                    outcome = attempt(self._outputs, self._classify, items, times, size)
        finally:
            seconds = time.perf_counter() - started
            times.add_call(len(items), seconds)
            if self.audit is not None:
                self.audit.spent(seconds, len(items))
        if outcome.ok and outcome.value is _ANSWER_ALONE:  # found on this call: its output is of no use
            return Success(self._each_alone(items, times))
        return outcome

    def run_audit(self) -> None:
        """On a model thread with nothing else to do: the audit's candidate alone (see :class:`Audit`)."""
        if self.audit is not None and self._broken is None and not self._answers_alone():
            with self._gate.shared():
                self.audit.run()

    def _outputs(self, items: list, times: StageTimes, size: Optional[int] = None) -> Any:
        """One output per item, or :data:`_ANSWER_ALONE` when the split cannot cut this output.
        ``size``: the bucket to pad ``items`` up to (copies of the last one), whose extra outputs
        are dropped."""
        real = items
        if size is not None and size > len(items):
            items = items + [items[-1]] * (size - len(items))
        with self._gate.shared():
            output = self._forward(items)
        if self._split is None:
            outputs = list(output)
        else:
            try:
                try:
                    outputs = list(self._split(output, len(items)))
                except LayoutUnknown as unknown:
                    outputs = self._probe_then_split(items, output, unknown, times)
            except AnswerAlone:
                return _ANSWER_ALONE
        if len(outputs) != len(items):
            # A contract bug in the model step; a real check, not an assert (python -O drops those).
            raise SplitFailed(f"inference returned {len(outputs)} outputs for a micro-batch of {len(items)}: "
                              f"split(output, count) must return one output per item")
        outputs, items = outputs[:len(real)], real  # the pad rows' outputs go
        if self.audit is not None and len(items) > 1:
            self.audit.offer(items, outputs)
        return outputs

    def _each_alone(self, items: list, times: StageTimes) -> list:
        """One model call per item; each output whole, or that item's own Failure."""
        with self._lock:
            self.answered_alone += len(items)
        times.add_alone(len(items))
        results = []
        for item in items:
            outcome = self._call([(None, item)], times)
            results.append(outcome.value[0] if outcome.ok else outcome)
        return results

    def _probe_then_split(self, items: list, output: Any, unknown: LayoutUnknown, times: StageTimes) -> list:
        """The output's layout is unknown: call the model on inputs derived from these (blank,
        noise) at this size, and at other sizes (the first half, then one request, then one more
        than the micro-batch; a lone request twice, then three times over) until the layout is
        learned from what was seen, then split (or answer each request alone)."""
        count = len(items)
        if count >= 2:
            probes = [items[: count // 2], items[:1], items[:1] * (count + 1)]
        else:
            probes = [items * 2, items * 3]
        observations = [(count, output)]
        varied = False
        for variant in self._derive(items):
            derived = self._probe(variant, times)
            if derived is not None:
                observations.append((count, derived))
                varied = True
        for probe in probes:
            if len(probe) in {n for n, _ in observations}:
                continue
            if count == 1 and unknown.alone is not None:
                seen = self._probe_lone(probe, times)
                if seen is None:  # out of memory: the request that fitted alone keeps its answer
                    return self._lone_answer(output)
            else:
                seen = self._probe(probe, times, must_run=True)
            observations.append((len(probe), seen))
            try:
                unknown.learn(observations, varied)
                break
            except LayoutAmbiguous:
                if probe is probes[-1]:
                    raise
        log.info("probed the batch layout of the model's output at micro-batches of %s%s",
                 ", ".join(str(n) for n, _ in observations), " (derived inputs included)" if varied else "")
        return list(self._split(output, count))

    def _probe_lone(self, probe: list, times: StageTimes) -> Any:
        """A lone request's probe (itself repeated); None when it does not fit in memory, or is
        known not to (the cap is below its size)."""
        safe = self._safe_size
        if safe is not None and len(probe) > safe:
            return None
        try:
            return self._probe(probe, times, must_run=True)
        except Exception as exc:  # noqa: BLE001 - any other error fails the call as before
            if not is_out_of_memory(exc):
                raise
        log.info("the probe of a lone request's batch layout (a micro-batch of %d) ran out of memory: it is answered "
                 "by its own call, whole, and the layout stays unknown", len(probe))
        return None

    def _lone_answer(self, output: Any) -> list:
        """A lone request's output, cut by a layout learned meanwhile (on another model thread),
        else whole, as it would be answered alone."""
        try:
            return list(self._split(output, 1))
        except LayoutUnknown as unknown:
            return unknown.alone()

    def _probe(self, items: list, times: StageTimes, must_run: bool = False) -> Any:
        """The model's output on ``items``; a derived input it refuses (``must_run`` False) is no evidence: None."""
        started = time.perf_counter()
        try:
            with self._gate.shared():
                return self._forward(items)
        except Exception:  # noqa: BLE001 - blank or noise may be outside what the model takes
            if must_run:
                raise
            return None
        finally:
            times.add_call(len(items), time.perf_counter() - started)

    def _classify(self, exc: BaseException) -> RequestError:
        if self._breaks_device(exc):
            self.health.accelerator_broken(f"the accelerator is in an unrecoverable state ({type(exc).__name__}: "
                                           f"{_first_line(exc)})")
            log.critical("%s: this worker cannot serve any more and reports itself unhealthy", self._broken)
            error = InferenceFailed(f"the accelerator failed on this micro-batch and cannot be used any more "
                                    f"({type(exc).__name__}: {_first_line(exc)}); this worker is being replaced")
            error.retry_may_cure = False
            return error
        return inference_error(exc)

    # -- out of memory ----------------------------------------------------------------------------

    def _remember_out_of_memory(self, size: int) -> None:
        with self._lock:
            self._smallest_oom = size if self._smallest_oom is None else min(size, self._smallest_oom)
            self._update_safe_size()

    def _remember_fit(self, size: int) -> None:
        with self._lock:
            if self._smallest_oom is not None and size >= self._smallest_oom:
                log.warning("a micro-batch of %d fitted in memory again: the cap of %s is lifted", size, self._safe_size)
                self._smallest_oom = self._safe_size = None
                self._sizes_that_fit.clear()
                self._capped_batches = 0
            if size not in self._sizes_that_fit:
                self._sizes_that_fit.add(size)
                if self._smallest_oom is not None:
                    self._update_safe_size()

    def _update_safe_size(self) -> None:
        # The largest size seen to fit below the smallest that ran out of memory (until one is
        # seen: one less than that).
        below = [s for s in self._sizes_that_fit if s < self._smallest_oom]
        safe = max(below) if below else max(1, self._smallest_oom - 1)
        if safe != self._safe_size:
            self._safe_size = safe
            log.warning("out of memory in inference: micro-batches are capped at %d from now on", safe)


_ANSWER_ALONE = object()  # _outputs' word that each request must get a model call of its own


class _Gate:
    """Model calls run side by side (``shared``), or one alone (``exclusive``: it waits for those
    running, and new ones wait for it). ``overlapped``, per thread: a call of this thread ran
    beside another since it was last reset."""

    def __init__(self):
        self._changed = threading.Condition()
        self._running: dict = {}  # thread id -> whether its call saw another beside it
        self._alone = None  # the thread running alone, if one is
        self._waiting = 0  # threads waiting to run alone: new calls let them go first
        self._local = threading.local()

    @property
    def overlapped(self) -> bool:
        return getattr(self._local, "overlapped", False)

    @overlapped.setter
    def overlapped(self, value: bool) -> None:
        self._local.overlapped = value

    @contextlib.contextmanager
    def shared(self):
        me = threading.get_ident()
        if self._alone == me or me in self._running:  # inside its own exclusive (or shared) call
            yield
            return
        with self._changed:
            self._changed.wait_for(lambda: self._alone is None and not self._waiting, EXCLUSIVE_WAIT_S)
            if self._running:
                for other in self._running:
                    self._running[other] = True
            self._running[me] = bool(self._running)
        try:
            yield
        finally:
            with self._changed:
                if self._running.pop(me):
                    self._local.overlapped = True
                self._changed.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        me = threading.get_ident()
        with self._changed:
            self._waiting += 1
            try:
                alone = self._changed.wait_for(lambda: self._alone is None and not self._running, EXCLUSIVE_WAIT_S)
            finally:
                self._waiting -= 1
            if alone:
                self._alone = me
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                if self._alone == me:
                    self._alone = None
                self._changed.notify_all()


def _unavailable(reason: str) -> RequestError:
    return ServiceUnavailable(f"this worker cannot serve now: {reason}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
