"""The TorchServe adapter: turns ``handle(data, context)`` into a run of the batching engine.

This is the one module that knows TorchServe's contract (the context object, the shape of
``data``, per-request status and headers). Users subclass :class:`MicroBatchHandler`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch

from ._engine import BatchEngine, BatchReport
from ._errors import BadRequest
from ._loading import load_archived_model, prepare_model
from ._request import Request, body_of
from ._responses import JSON, content_type, json_ready
from ._scatter import split_output
from ._metrics import report_metrics
from ._settings import ConfigError, EngineSettings, read_settings

log = logging.getLogger(__name__)

BATCH_SIZE_HEADER = "X-Batch-Size"
# The exit status of a worker that ended itself to be replaced (it shows in TorchServe's log).
WORKER_REPLACED_EXIT_CODE = 75


def device_for(system_properties: Mapping[str, Any]) -> torch.device:
    """The device TorchServe assigned to this worker: ``cuda:<gpu_id>`` when it gave a GPU id and
    CUDA is usable, else the CPU."""
    gpu_id = system_properties.get("gpu_id")
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


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
        :class:`UnsupportedMediaType` (415) to answer this request alone.
    ``collate(items) -> batch``
        Join one micro-batch and move it to ``self.device`` (default: ``torch.stack``).
    ``infer(batch) -> output``
        Run the model (default: ``self.model(batch)``), under ``torch.inference_mode()``.
    ``split(output, count) -> [output, ...]``
        Cut the micro-batch output into one output per item (default: along dim 0, on the CPU).
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
    # torch_threads: torch's CPU threads in this worker (0: torch's default, one per core). With
    # several workers on one machine, cores / workers keeps them from oversubscribing the cores.
    options: ClassVar[dict] = {"precision": "float32", "channels_last": False, "torch_threads": 0}

    def __init__(self):
        self.initialized = False
        self.model: Any = None
        self.device = torch.device("cpu")
        self.settings: Optional[EngineSettings] = None
        self.config: dict = {}
        self.manifest: dict = {}
        self.model_dir = "."
        self._engine: Optional[BatchEngine] = None
        self._unhealthy_after_last_batch = False
        self._model_thread = threading.local()  # each model thread's own CUDA stream

    # -- TorchServe entry points ----------------------------------------------------------------

    def initialize(self, context) -> None:
        """Read and check the settings, load the model on its device, start the pools."""
        self.settings, self.config = read_settings(context.model_yaml_config, self.all_options())
        threads = self.config["torch_threads"]
        if threads < 0:
            raise ConfigError(f"handler.torch_threads must be >= 0 (0: torch's default), got {threads!r}")
        if threads:
            torch.set_num_threads(threads)  # process-wide: a worker is one process
        self.device = device_for(context.system_properties)
        self.manifest = context.manifest or {}
        self.model_dir = context.system_properties.get("model_dir", ".")
        self.setup(self.model_dir)
        model = self.load_model(self.model_dir, self.device)
        self.model = prepare_model(model, self.device, self.config["precision"], self.config["channels_last"])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the weights are in place before other streams read them
        self._engine = BatchEngine(
            self.preprocess_one, self._infer_micro_batch, self._postprocess_one_json_ready, self.settings,
            inference_on_cpu=self.device.type == "cpu",
            size_hint=self.size_hint if type(self).size_hint is not MicroBatchHandler.size_hint else None,
        )
        self.initialized = True
        log.info("%s ready on %s with %s", type(self).__name__, self.device, self.settings)

    def handle(self, data: Sequence[Mapping[str, Any]], context) -> list:
        """Answer one TorchServe batch: exactly one response per request, in order."""
        if self._engine is None:
            raise RuntimeError(f"{type(self).__name__}.handle() called before initialize()")
        # Behind a KServe envelope the rows are the instances of one request: each gets its headers.
        one_request = len(data) != len(getattr(context, "request_processor", None) or data)
        requests = [
            Request(body_of(row), self._headers(context, 0 if one_request else idx)) for idx, row in enumerate(data)
        ]
        if self._unhealthy_after_last_batch:
            self._end_worker_if_still_unhealthy(self._engine, context)
        report = self._engine.run(requests)
        report_metrics(context, report)
        self._unhealthy_after_last_batch = not self._engine.healthy
        if self._unhealthy_after_last_batch:
            log.error("this worker is unhealthy (%s): it ends itself when the next batch arrives",
                      self._engine.unhealthy_reason)
        return self._respond(report, context)

    @classmethod
    def all_options(cls) -> dict:
        """The options of this class and of every handler class it derives from."""
        merged: dict = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("options", {}))
        return merged

    def close(self) -> None:
        """Stop the pools; idempotent. Call on unload (TorchServe ends the worker process)."""
        if self._engine is not None:
            self._engine.close()

    # -- hooks ----------------------------------------------------------------------------------

    def setup(self, model_dir: str) -> None:
        """Load what the per-request hooks need besides the model (labels, a tokenizer, ...);
        ``self.config`` holds the checked options. Runs once, before ``load_model``."""

    def load_model(self, model_dir: str, device: torch.device) -> Any:
        """Load the archive's model: ``--model-file`` + state_dict (``weights_only=True``), or a
        TorchScript ``--serialized-file``."""
        return load_archived_model(model_dir, self.manifest, device)

    def preprocess_one(self, request: Request) -> Any:
        """A JSON array of numbers → a float32 tensor."""
        payload = request.json()
        try:
            return torch.as_tensor(payload, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise BadRequest(f"expected a JSON array of numbers: {exc}") from None

    def collate(self, items: list) -> Any:
        """Stack the items and move the micro-batch to the model's device."""
        try:
            batch = torch.stack(items)
        except RuntimeError as exc:
            raise BadRequest(f"items of this micro-batch do not stack: {exc}") from None
        return batch.to(self.device, non_blocking=True)

    def size_hint(self, request: Request) -> float:
        """Override to group requests of like size into micro-batches (cheap: it runs on every
        request before preprocessing, e.g. a text's length). The default groups nothing."""
        return 0.0

    def infer(self, batch: Any) -> Any:
        """Call the model on one micro-batch."""
        return self.model(batch)

    def split(self, output: Any, count: int) -> list:
        """One output per item, by the output's structure (see ``handlers._scatter``): tensors
        cut along the first dimension after one copy to the CPU; tuples, dicts, named tuples and
        dataclasses cut field by field; a list taken as one entry per item. Anything else, or a
        first dimension that is not ``count``, is a :class:`SplitFailed` (500) naming the shapes."""
        if isinstance(output, torch.Tensor) and output.dim() and output.shape[0] == count:
            return list(output.detach().cpu().unbind(0))  # the common case, without the tree walk
        return split_output(output, count, to_host=_to_cpu)

    def postprocess_one(self, output: Any, item: Any) -> Any:
        """A tensor → nested lists (JSON-ready)."""
        return output.tolist() if isinstance(output, torch.Tensor) else output

    # -- internals ------------------------------------------------------------------------------

    def _postprocess_one_json_ready(self, output: Any, item: Any) -> Any:
        return json_ready(self.postprocess_one(output, item))

    @staticmethod
    def _end_worker_if_still_unhealthy(engine: BatchEngine, context) -> None:
        """Called when a batch arrives after one that left the engine unhealthy (a model call hung
        past its deadline, or every stage thread held by a hung stage). That batch was answered;
        if the engine is still unhealthy, end the worker process now, before answering this one,
        so that TorchServe starts a fresh worker.

        Why now and not right after the unhealthy batch's answer: TorchServe fails the batch in
        flight when its worker dies ("Worker died.", 500), but a job it has already polled for
        its next batch when it notices the death is lost for good (its WorkerThread fails only
        ``req``). Ending while this batch is in flight loses nothing."""
        reason = engine.unhealthy_reason
        if reason is None:
            return  # the stuck call returned in time: serve on
        if getattr(context, "cl_socket", None) is None:  # a test kit context: no process to end
            log.error("the handler is unhealthy (%s); no worker process to replace", reason)
            return
        log.critical("ending this worker so that TorchServe starts a fresh one (this batch gets "
                     "TorchServe's 'Worker died.'): %s", reason)
        logging.shutdown()
        os._exit(WORKER_REPLACED_EXIT_CODE)

    def _infer_micro_batch(self, items: list) -> list:
        # inference_mode is thread-local: enter it on the model thread that runs this.
        with torch.inference_mode(), self._own_stream() as stream:
            outputs = self.split(self.infer(self.collate(items)), len(items))
            if stream is not None:
                # Outputs a custom split leaves on the GPU are read by pool threads, on other streams.
                stream.synchronize()
            return outputs

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
            stream = self._model_thread.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            yield stream

    @staticmethod
    def _headers(context, idx: int) -> dict:
        try:
            return dict(context.get_all_request_header(idx) or {})
        except (AttributeError, IndexError, TypeError):
            return {}

    @staticmethod
    def _respond(report: BatchReport, context) -> list:
        outcomes = report.outcomes
        requests = len(getattr(context, "request_processor", None) or outcomes)
        for idx in range(requests):
            context.set_response_header(idx, BATCH_SIZE_HEADER, str(requests))
        failures = [(idx, outcome.error) for idx, outcome in enumerate(outcomes) if not outcome.ok]
        if requests != len(outcomes):
            # Behind a KServe envelope the items are the instances of one request: its status is
            # that of the first failed instance; every instance keeps its own answer or error.
            failures = [(0, error) for _, error in failures[:1]]
        responses = [outcome.value if outcome.ok else outcome.error.to_json() for outcome in outcomes]
        for idx in range(requests):
            context.set_response_content_type(idx, content_type(responses[idx]) if requests == len(outcomes) else JSON)
        for idx, error in failures:
            context.set_response_status(error.status, error.phrase, idx)
        return responses
