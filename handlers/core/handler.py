"""The handler core: the hooks a user writes and the engine that runs them, with no server in it.

A server adapter (``handlers.servers.torchserve``, ``handlers.servers.ray_serve``, the test kit's
``handlers.testing.LocalServer``) turns its own requests into :class:`Request` objects, calls
:meth:`MicroBatchHandler.respond`, and turns each :class:`Response` back into its own kind.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch

from handlers.core.accelerator_errors import breaks_device
from handlers.core.compiled import Compiled, compile_buckets, read_compile
from handlers.core.derived_inputs import derived_inputs
from handlers.core.loading import PRECISIONS, load_model_files, model_dtype, prepare_model
from handlers.core.request import NO_BODY, Request, deadline_of, decoded_body
from handlers.core.responses import JSON, Encoded, encoded, error_answer
from handlers.core.self_test import SUMMARY_RECORD, first_difference, load_samples, run_self_test, tolerance
from handlers.engine.audit import DEFAULT_SHARE, Audit
from handlers.engine.batch_engine import BatchEngine, BatchReport
from handlers.engine.buckets import Buckets
from handlers.engine.errors import BadRequest, InternalError, UnsupportedMediaType
from handlers.engine.model_call import ModelCall
from handlers.engine.scatter import ITEMS, SHARED, Batched, Scatter, declared_special, leaves_of, map_arrays
from handlers.engine.settings import (ConfigError, EngineSettings, ModelFiles, read_handler_settings, shared_threads,
                                      usable_cores)

log = logging.getLogger(__name__)
# TorchServe hands a form post (curl -d without a Content-Type) over as fields with no body.
NO_BODY_MESSAGE = ("the request came as a form (fields, no raw body), which this handler does not read: send "
                   "the body raw with its Content-Type (e.g. application/json or text/plain); curl -d without "
                   "-H 'Content-Type: ...' sends a form")


@dataclass(frozen=True)
class Response:
    """One request's answer, as the core gives it to a server adapter: an HTTP status, a body
    (JSON values, ``str`` or ``bytes``), its Content-Type, and ``payload``, the body encoded to
    the bytes that go out (done on the pool for answers; from ``body`` when not given)."""

    status: int
    body: Any
    content_type: str = JSON
    headers: Mapping[str, str] = field(default_factory=dict)
    payload: Optional[bytes] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.payload is None:
            object.__setattr__(self, "payload", encoded(self.body).payload)


def _abandoned(request: Any):
    """The 408 (client gave up) or 503 (the server's own budget passed) for a request nobody waits
    for any more (see :meth:`Request.abandoned`)."""
    return request.abandoned() if isinstance(request, Request) else None


def _to_cpu(leaf: Any) -> Any:
    return leaf.detach().cpu() if isinstance(leaf, torch.Tensor) else leaf


class MicroBatchHandler:
    """Base handler: parallel preprocessing, pipelined micro-batch inference, scatter postprocessing.

    Override the hooks you need; each per-request hook is a pure function of its arguments and
    runs concurrently on a thread pool, so it must not write to ``self``.

    ``load_model(model_dir, device)``
        Build the model (default: the archive's model file + state_dict, or TorchScript).
    ``preprocess_one(request) -> item``
        Decode and validate one :class:`Request` (default: a JSON array → float32 tensor).
        Raise :class:`BadRequest` (400), :class:`PayloadTooLarge` (413) or
        :class:`UnsupportedMediaType` (415) to answer this request alone. Tensors it puts on
        ``self.device`` are queued on the pool thread's default stream: the model thread's stream
        waits for that stream's work before ``collate`` reads them.
    ``collate(items) -> batch``
        Join one micro-batch and move it to ``self.device`` (default: ``torch.stack``).
    ``infer(batch) -> output``
        Run the model (default: ``self.model(batch)``), under ``torch.inference_mode()``.
    ``split(output, count) -> [output, ...]``
        Cut the micro-batch output into one output per item (default: by the batch layout proven
        on samples, declared in ``batch_dims``, or probed once; see ``handlers.engine.scatter``).
    ``postprocess_one(output, item) -> response``
        Turn one output into a response (default: ``output.tolist()``).

    Settings come from the ``handler:`` section of the archive's model config (see
    :class:`EngineSettings`); a subclass declares its own in ``options`` with their defaults.

    Example::

        class Doubler(MicroBatchHandler):
            def load_model(self, model_dir, device):
                return torch.nn.Identity()

            def postprocess_one(self, output, item):
                return {"double": (2 * output).tolist()}
    """

    # Settings of every handler; a subclass's own ``options`` are added to these.
    # torch_threads: torch's CPU threads in this worker (0: torch's default, one per core, shared
    # among the inference_workers' micro-batches, see shared_threads). With several workers on one
    # machine, cores / workers keeps them from oversubscribing the cores.
    # batch_dims: how the output is batched, by output path (see handlers.engine.scatter): a tensor's
    # batch dimension, "items", "shared", {"index_column": c} (rows naming their request in column
    # c) or {"counts": "<path>"} (values cut by per-request counts). invariance_rtol/atol: how close a sample's answer
    # beside other requests must be to its answer alone, in the start-up self-test.
    # audit_share: the most of the model's time spent re-running a served request alone, on idle
    # model time, to compare with its batched answer (handlers.engine.audit); 0 turns it off.
    # compile: infer compiled at fixed micro-batch sizes, warmed and checked at start-up (see
    # handlers.core.compiled); empty: eager.
    # request_budget_s: seconds from a request's arrival after which its answer is no longer
    # awaited (0: only the client's x-request-timeout-seconds, if it sends one); a request the
    # model has not reached by then gets a 503 with Retry-After at once and costs no model time.
    options: ClassVar[dict] = {"precision": "float32", "channels_last": False, "torch_threads": 0,
                               "batch_dims": {}, "invariance_rtol": 1e-3, "invariance_atol": 1e-4,
                               "request_budget_s": 0.0, "audit_share": DEFAULT_SHARE, "compile": {}}

    def __init__(self):
        self.initialized = False
        self.model: Any = None
        self.device = torch.device("cpu")
        self.settings: Optional[EngineSettings] = None
        self.config: dict = {}
        self.manifest: dict = {}  # the archive's manifest, where the server has one
        self.model_files = ModelFiles()
        self.model_dir = "."
        self._engine: Optional[BatchEngine] = None
        self._model_thread = threading.local()  # each model thread's own CUDA stream
        self._output_buffers = OutputBuffers()
        self._scatter = Scatter()
        self.input_dtype = torch.float32  # floating inputs are cast to the model's precision
        self.self_test: Any = None  # the start-up self-test's report, when samples ran
        self.compiled: Optional[Compiled] = None  # what start-up compiled (handler.compile), if anything

    # -- settings -------------------------------------------------------------------------------

    @classmethod
    def all_options(cls) -> dict:
        """The options of this class and of every handler class it derives from."""
        merged: dict = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("options", {}))
        return merged

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Check the handler's own options (types are already checked against the defaults);
        raise :class:`ConfigError` naming the key, the rule and the value. Runs at start-up and
        in ``python -m handlers.archive --check``, so a subclass that overrides it (calling
        ``super().check_options(options)``) gets its rules checked before anything is served."""
        found = []  # every problem at once
        if options["precision"] not in PRECISIONS:
            found.append(f"handler.precision must be one of {', '.join(PRECISIONS)}, got {options['precision']!r}")
        if options["torch_threads"] < 0:
            found.append(f"handler.torch_threads must be >= 0 (0: torch's default), got {options['torch_threads']!r}")
        for path, dim in options["batch_dims"].items():
            if not isinstance(path, str) or not path.startswith("output") or not (
                dim in (ITEMS, SHARED) or isinstance(dim, int) and not isinstance(dim, bool)
                or declared_special(dim) is not None
            ):
                found.append(f"handler.batch_dims maps an output path ('output', 'output[0]', "
                             f"\"output['logits']\") to a dimension, 'items', 'shared', {{'index_column': c}} "
                             f"or {{'counts': \"output['counts']\"}}, got {path!r}: {dim!r}")
        if not 0 <= options["audit_share"] <= 0.5:
            found.append(f"handler.audit_share must be between 0 (off) and 0.5, got {options['audit_share']!r}")
        for key in ("invariance_rtol", "invariance_atol", "request_budget_s"):
            if options[key] < 0:
                found.append(f"handler.{key} must be >= 0, got {options[key]!r}")
        try:
            read_compile(options["compile"])
        except ConfigError as exc:
            found.append(str(exc))
        if found:
            raise ConfigError("\n".join(found))

    @classmethod
    def read_config(cls, section: Optional[Mapping[str, Any]], server_timeout_s: Optional[float] = None,
                    server_timeout_name: str = "the server's timeout") -> tuple[EngineSettings, dict]:
        """The engine settings and this handler's checked options from a ``handler:`` section:
        the one schema that start-up and the archive check both use. Every problem of the
        section is reported at once (one line each), ``check_options``' with the others."""
        return read_handler_settings(section, cls.all_options(), server_timeout_s, server_timeout_name,
                                     check_options=cls.check_options)

    # -- life cycle (called by a server adapter) --------------------------------------------------

    def start(self, model_dir: str = ".", section: Optional[Mapping[str, Any]] = None, device: Any = "cpu",
              model_files: ModelFiles = ModelFiles(), server_timeout_s: Optional[float] = None,
              server_timeout_name: str = "the server's timeout", samples: Optional[Sequence] = None,
              cpus: Optional[int] = None) -> None:
        """Read and check the settings, load the model on ``device``, run the self-test on the
        samples (``samples``, else those shipped in ``model_dir``; see ``handlers.core.self_test``),
        start the pools. ``cpus``: the cores this worker may use (a Ray replica's reservation;
        default: those the process may run on). When ``torch_threads`` is 0 and ``cpus`` is given
        or several micro-batches run on the model at once, torch's threads are those cores,
        shared among the micro-batches. Raises ConfigError (``SelfTestFailed`` for a failed
        self-test)."""
        self.settings, self.config = self.read_config(section, server_timeout_s, server_timeout_name)
        threads = self.worker_threads(cpus)
        if threads and not self.config["torch_threads"]:
            log.info("torch uses %d thread(s) per micro-batch, %d micro-batch(es) on the model at once",
                     threads, self.settings.inference_workers)
        if threads:
            torch.set_num_threads(threads)  # process-wide: a worker is one process
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if self.device.index is None:  # "cuda" (Ray Serve): the one the process sees first
                self.device = torch.device("cuda", torch.cuda.current_device())
            # This thread's current device: loading, the self-test and its streams on gpu_id, not
            # on GPU 0 too (a CUDA context there costs every worker of the machine memory).
            torch.cuda.set_device(self.device)
        if self.device.type != "cuda" and (self.config["precision"] != "float32" or self.config["channels_last"]):
            log.warning("handler.precision %s / channels_last %s take effect on a GPU only: this worker runs on %s "
                        "in float32", self.config["precision"], self.config["channels_last"], self.device)
        self.model_dir = str(model_dir)
        self.model_files = model_files
        self.setup(self.model_dir)
        model = self.load_model(self.model_dir, self.device)
        self.model = prepare_model(model, self.device, self.config["precision"], self.config["channels_last"])
        self.input_dtype = model_dtype(self.model)
        self._scatter = Scatter(self.config["batch_dims"])
        self.on_device()
        if self.device.type == "cuda":
            # The weights and on_device's tensors are in place before other streams read them.
            torch.cuda.synchronize(self.device)
        samples = load_samples(self.model_dir) if samples is None else list(samples)
        if samples:
            self.self_test = run_self_test(self, samples, default_split=type(self).split is MicroBatchHandler.split)
            # One sample (or copies of one) cannot show a model that mixes its batch: say so loudly.
            level = logging.INFO if self.self_test.distinct >= 2 else logging.WARNING
            log.log(level, "%s %s", type(self).__name__, self.self_test.summary(), extra={SUMMARY_RECORD: True})
        compile_settings = read_compile(self.config["compile"])
        if compile_settings is not None:
            self.compiled = compile_buckets(self, compile_settings, samples)
        if self.device.type == "cuda":
            # The self-test's activations stay in torch's cache, reserved for the worker's life.
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        # A split of the user's own may still hand its output to the scatter (super().split).
        model_call = ModelCall(self._forward, self._split_on_host, breaks_device=breaks_device,
                               derive=derived_inputs, answers_alone=lambda: self._scatter.answers_alone,
                               audit=self._audit(), buckets=self._buckets())
        self._engine = BatchEngine(
            self._preprocess_request, model_call, self._postprocess_one_encoded, self.settings,
            inference_on_cpu=self.device.type == "cpu",
            size_hint=self.size_hint if type(self).size_hint is not MicroBatchHandler.size_hint else None,
            abandoned=_abandoned,
        )
        self.initialized = True
        log.info("%s ready on %s with %s", type(self).__name__, self.device, self.settings)

    def worker_threads(self, cpus: Optional[int] = None) -> int:
        """torch's threads in a worker of this model on ``cpus`` cores (default: those the process
        may run on), from its read settings: ``torch_threads``, else, when ``cpus`` is given or
        several micro-batches run on the model at once, those cores shared among them
        (:func:`~handlers.engine.settings.shared_threads`); 0 leaves torch's default."""
        threads = self.config["torch_threads"]
        if not threads and (cpus or self.settings.inference_workers > 1):
            threads = shared_threads(cpus or usable_cores(), self.settings.inference_workers)
        return threads

    def respond(self, requests: Sequence[Request]) -> tuple[list, BatchReport]:
        """Answer one batch: exactly one :class:`Response` per request, in order, and the batch's
        report (for metrics). Never raises once started."""
        if self._engine is None:
            raise RuntimeError(f"{type(self).__name__} answered a batch before start()")
        report = self._engine.run(requests)
        responses = []
        for outcome in report.outcomes:
            if outcome.ok:
                responses.append(Response(200, outcome.value.value, outcome.value.content_type,
                                          payload=outcome.value.payload))
            else:  # built per request, never raising (see error_answer)
                answer = error_answer(outcome.error)
                responses.append(Response(answer.status, answer.encoded.value, JSON, answer.headers,
                                          payload=answer.encoded.payload))
        return responses, report

    def deadline_for(self, headers: Mapping[str, str], arrived: float) -> Optional[float]:
        """When the answer to a request that ``arrived`` (``time.monotonic()``) with ``headers``
        stops being awaited: its client's ``x-request-timeout-seconds`` or ``request_budget_s``,
        the sooner (see :func:`handlers.core.request.deadline_of`); the adapter puts it on the
        :class:`Request`."""
        return deadline_of(headers, arrived, self.config.get("request_budget_s", 0.0))

    @property
    def unhealthy_reason(self) -> Optional[str]:
        """Why this handler cannot serve (see :attr:`BatchEngine.unhealthy_reason`), or None."""
        return None if self._engine is None else self._engine.unhealthy_reason

    def close(self) -> None:
        """Stop the pools; idempotent. Call on unload (TorchServe ends the worker process)."""
        if self._engine is not None:
            self._engine.close()

    # -- TorchServe's entry points: the adapter in handlers.servers.torchserve does the work ----------------

    def initialize(self, context) -> None:
        """TorchServe's start-up call (see :func:`handlers.servers.torchserve.initialize`)."""
        from handlers.servers import torchserve as _torchserve

        _torchserve.initialize(self, context)

    def handle(self, data: Sequence[Mapping[str, Any]], context) -> list:
        """TorchServe's per-batch call (see :func:`handlers.servers.torchserve.handle`)."""
        from handlers.servers import torchserve as _torchserve

        return _torchserve.handle(self, data, context)

    # -- hooks ----------------------------------------------------------------------------------

    def setup(self, model_dir: str) -> None:
        """Load what the per-request hooks need besides the model (labels, a tokenizer, ...);
        ``self.config`` holds the checked options. Runs once, before ``load_model``."""

    def on_device(self) -> None:
        """Put what the model threads share besides the model on ``self.device`` (e.g.
        normalisation constants), once: it runs after ``load_model`` and before the device is
        synchronised, so that every model thread's stream sees it complete."""

    def load_model(self, model_dir: str, device: torch.device) -> Any:
        """Load the model files the server named (``self.model_files``): a model file + its
        state_dict (``weights_only=True``), or a TorchScript file."""
        return load_model_files(model_dir, self.model_files, device)

    def preprocess_one(self, request: Request) -> Any:
        """A JSON array of numbers → a float32 tensor."""
        payload = request.json()
        try:
            return torch.as_tensor(payload, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise BadRequest(f"expected a JSON array of numbers: {exc}") from None

    def collate(self, items: list) -> Any:
        """Stack the items and move the micro-batch to the model's device."""
        try:
            batch = torch.stack(items)
        except RuntimeError as exc:
            raise BadRequest(f"items of this micro-batch do not stack: {exc}") from None
        return self.to_model(batch)

    def to_model(self, batch: torch.Tensor) -> torch.Tensor:
        """A host tensor as the model takes it: on its device (through pinned memory, so that the
        copy is asynchronous on a GPU) and, when floating, in the model's precision."""
        dtype = self.input_dtype if batch.is_floating_point() else batch.dtype
        if self.device.type == "cuda":
            if batch.device.type == "cpu":
                batch = batch.pin_memory()
            return batch.to(self.device, dtype=dtype, non_blocking=True)
        return batch.to(self.device, dtype=dtype)

    def size_hint(self, request: Request) -> float:
        """Override to group requests of like size into micro-batches (cheap: it runs on every
        request before preprocessing, e.g. a text's length). The default groups nothing."""
        return 0.0

    def infer(self, batch: Any) -> Any:
        """Call the model on one micro-batch."""
        return self.model(batch)

    def split(self, output: Any, count: int) -> list:
        """One output per item, by the batch layout known from evidence (see
        ``handlers.engine.scatter``): declared in ``batch_dims``, learned from the samples at start-up,
        or probed once on live traffic. Tensors are copied to the CPU once, then cut; tuples,
        dicts, named tuples and dataclasses cut field by field. An output no layout can be
        trusted to cut is answered alone: one model call per request, its whole output."""
        layout = self._scatter.layout
        if type(layout) is Batched and isinstance(output, torch.Tensor) and output.dim() > layout.dim \
                and output.shape[layout.dim] == count:
            return list(output.detach().cpu().unbind(layout.dim))  # the common case, without the tree walk
        return self._scatter.split(output, count, to_host=_to_cpu)

    def postprocess_one(self, output: Any, item: Any) -> Any:
        """A tensor → nested lists (JSON-ready)."""
        return output.tolist() if isinstance(output, torch.Tensor) else output

    # -- internals ------------------------------------------------------------------------------

    def _buckets(self) -> Buckets:
        """The compiled sizes, if any. A short micro-batch is padded up to one only while the
        self-test has proven the model batch-invariant (two different samples or more, a layout
        trusted, nothing answered alone): the pad rows then cannot change the real rows' answers."""
        if self.compiled is None:
            return Buckets()

        def proven() -> bool:
            report = self.self_test
            return (report is not None and report.distinct >= 2 and report.alone_reason is None
                    and not self._scatter.answers_alone)

        if not proven():
            log.info("handler.compile: batch invariance is not proven by the self-test, so micro-batches are not "
                     "padded: the compiled model serves exactly %s, eager every other size",
                     ", ".join(map(str, self.compiled.sizes)))
        return Buckets(self.compiled.sizes, may_pad=proven, min_fill=self.compiled.settings.min_fill)

    def _audit(self) -> Optional[Audit]:
        """Now and then a request of a micro-batch runs again alone and is compared (see
        :mod:`handlers.engine.audit`); a disagreement refutes the layout for good."""
        share = self.config["audit_share"]
        if not share:
            return None
        rtol, atol = tolerance(self)

        def refute(reason: str) -> None:
            log.error("%s: some answers given in micro-batches may have held the wrong data", reason)
            self._scatter.answer_alone(reason, for_one=self._scatter.layout)

        def compare(alone: Any, batched: Any, item: Any) -> Optional[str]:
            # The answers as the client gets them, as the self-test compares them: a full ranking
            # of 1000 near-tied classes (argsort of a random ResNet's softmax) reorders its tail
            # on differences of 1e-7 (a compiled batch against eager alone), which no answer shows.
            return first_difference(self._postprocess_one_encoded(alone, item).value,
                                    self._postprocess_one_encoded(batched, item).value, rtol, atol)

        return Audit(lambda item: self._split_on_host(self._forward([item]), 1)[0], compare, refute, share)

    def _preprocess_request(self, request: Request) -> Any:
        if request.body is NO_BODY:  # no hook can read it: say what the client should send
            raise UnsupportedMediaType(NO_BODY_MESSAGE)
        if isinstance(request.body, (bytes, bytearray)):
            # Decoded here, on the pool, not by the server's main thread or event loop: the
            # hooks see a JSON body decoded and text as str on every server.
            body = decoded_body(request.body, request.header("Content-Type"))
            if body is not request.body:
                request = replace(request, body=body)
        return self.preprocess_one(request)

    def _postprocess_one_encoded(self, output: Any, item: Any) -> Encoded:
        # The outputs are inference tensors: an in-place op on one is only allowed in inference mode.
        with torch.inference_mode():
            answer = self.postprocess_one(output, item)
        # Encoded here, on the pool, once: the server's main thread only forwards the bytes.
        return encoded(answer)

    def _forward(self, items: list, infer: Any = None, new_graph_step: bool = False) -> Any:
        """collate → infer for one micro-batch, on the model thread that runs it: the compiled
        ``infer`` at a compiled size, else the hook itself (``infer``: this one instead)."""
        if infer is None:
            compiled = self.compiled
            infer = self.infer
            if compiled is not None and len(items) in compiled.sizes:
                infer, new_graph_step = compiled.infer, compiled.cudagraphs
        tensors = [leaf for leaf in leaves_of(items).values() if isinstance(leaf, torch.Tensor)]
        versions = [tensor._version for tensor in tensors]  # they move on every in-place change
        # inference_mode is thread-local: enter it on the model thread that runs this.
        with torch.inference_mode(), self._own_stream() as stream:
            if stream is not None:
                _take_over(tensors, stream, torch.cuda.default_stream(self.device))
            batch = self.collate(items)
            if new_graph_step:  # a CUDA graph's outputs are overwritten by its next replay: copied below
                torch.compiler.cudagraph_mark_step_begin()
            output = infer(batch)
        if versions != [tensor._version for tensor in tensors]:
            # A retry, a probe or an audit sends the same items again: changed, they would get
            # another answer, in a 200.
            raise InputChangedInPlace("collate or infer changed a request's preprocessed tensor in place; a retry "
                                      "or a lone call would see the changed input: work on a copy (x = x.clone())")
        if self._output_buffers.note(output) or new_graph_step:
            with torch.inference_mode():
                output = map_arrays(output, _copy_tensor)
        return output

    def _split_on_host(self, output: Any, count: int) -> list:
        """``split`` on the model thread; outputs a custom split leaves on the GPU are made safe
        for the pool threads that read them on the default stream."""
        with torch.inference_mode(), self._own_stream() as stream:
            parts = self.split(output, count)
            if stream is not None:
                _hand_over(parts, stream, torch.cuda.default_stream(self.device))
            return parts

    @contextlib.contextmanager
    def _own_stream(self):
        """On a GPU, each model thread queues its copies and kernels on a CUDA stream of its own,
        so that with ``inference_workers`` > 1 one micro-batch's host-to-device copy overlaps
        another's kernels. Yields the stream (None on the CPU)."""
        if self.device.type != "cuda":
            yield None
            return
        stream = getattr(self._model_thread, "stream", None)
        if stream is None:
            # Once per thread: the current device is per thread, and leaving the stream context
            # switches back to it (device 0 by default: a CUDA context there for gpu_id 1+).
            torch.cuda.set_device(self.device)
            stream = self._model_thread.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            yield stream


class InputChangedInPlace(InternalError):
    """500: the model step changed its input in place; no retry can cure it."""

    retry_may_cure = False


def _copy_tensor(leaf: Any) -> Any:
    return leaf.clone() if isinstance(leaf, torch.Tensor) else leaf


class OutputBuffers:
    """Finds a model that returns the same memory on every call (a buffer it keeps and writes
    into, so that each call overwrites the parts of the last one while the pool still reads them).
    A new output whose storage is that of the previous one while the previous one is still alive
    is the same buffer: live memory is never handed out twice. Until a second call tells, and
    from then on if it is a buffer, outputs are copied (:meth:`note` says when)."""

    def __init__(self):
        self._previous: list = []  # (storage address, weak reference to the tensor holding it)
        self.reused: Optional[bool] = None  # unknown until a second call

    def note(self, output: Any) -> bool:
        """Record a model call's output; True when it must be copied before it is used."""
        if self.reused is not None:
            return self.reused
        seen = []
        for leaf in leaves_of(output).values():
            if isinstance(leaf, torch.Tensor) and leaf.numel():
                address = leaf.untyped_storage().data_ptr()
                seen += [(address, weakref.ref(owner)) for owner in (leaf, leaf._base) if owner is not None]
        if not seen:
            return False
        if self._previous:
            alive = {address for address, ref in self._previous if ref() is not None}
            self.reused = any(address in alive for address, _ in seen)
            if self.reused:
                log.warning("the model returns the same memory on every call (a buffer it keeps): its outputs are "
                            "copied from now on, so that a call cannot overwrite the answers of the one before")
            self._previous = []
            return self.reused
        self._previous = seen
        return True


def _take_over(tensors: list, stream, producer) -> None:
    """GPU tensors a pool thread's ``preprocess_one`` made on ``producer`` (its default stream)
    are read on the model thread's ``stream``: ``stream`` waits for ``producer``'s work so far,
    and their memory is not reused until ``stream``'s work is done (record_stream).
    ``tensors``: the micro-batch's items' tensors."""
    tensors = [tensor for tensor in tensors if tensor.is_cuda]
    if not tensors:
        return  # host items: to_model's copies are queued on the model stream itself
    stream.wait_stream(producer)
    for tensor in tensors:
        tensor.record_stream(stream)


def _hand_over(parts: list, stream, reader) -> None:
    """GPU tensors made on the model thread's ``stream`` are read on ``reader`` (the pool threads'
    default stream): their memory is not reused until ``reader``'s work is done (record_stream),
    and ``stream``'s kernels are finished before the pool sees them."""

    def record(leaf):
        if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
            leaf.record_stream(reader)
        return leaf

    for part in parts:
        map_arrays(part, record)
    stream.synchronize()
