"""The TorchServe adapter: TorchServe's ``initialize(context)`` and ``handle(data, context)``
turned into the handler core's ``start`` and ``respond``.

This is the one module that knows TorchServe's contract: the context object (model config,
manifest, system properties, request headers, per-request status, headers and metrics), the shape
of ``data``, the KServe envelopes, ``responseTimeout``, and how a worker asks to be replaced.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from handlers.core.compiled import with_pt2
from handlers.core.metrics import batch_metrics
from handlers.core.request import NO_BODY, Request
from handlers.core.responses import JSON, error_answer
from handlers.engine.errors import ResponseTooLarge, phrase_of, startup_failure_line
from handlers.engine.outcome import Failure
from handlers.engine.settings import SECTION, ModelFiles
from handlers.packaging.server_sections import response_timeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Dimension:
    """A metric dimension with the two fields of TorchServe's own (where TorchServe is absent)."""

    name: str
    value: str


def _dimension_class():
    try:  # TorchServe's own class when it is installed (imported when metrics are first sent)
        from ts.metrics.dimension import Dimension
    except ImportError:  # pragma: no cover - exercised where TorchServe is absent
        return _Dimension
    return Dimension


BATCH_SIZE_HEADER = "X-Batch-Size"
REQUEST_ID_HEADER = "X-Request-Id"
# The exit status of a worker that ended itself to be replaced (it shows in TorchServe's log).
WORKER_REPLACED_EXIT_CODE = 75
# TorchServe's default max_response_size (ConfigManager.getMaxResponseSize), in bytes.
DEFAULT_MAX_RESPONSE_SIZE = 6553500
# Bytes kept below max_response_size: the frontend checks each field of the worker's reply
# against it; the margin covers framing that another TorchServe version may count in.
RESPONSE_SIZE_HEADROOM = 1024


def device_for(system_properties: Mapping[str, Any]):
    """The device TorchServe assigned to this worker: ``cuda:<gpu_id>`` when it gave a GPU id and
    CUDA is usable, else the CPU."""
    import torch

    gpu_id = system_properties.get("gpu_id")
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def model_files_from_manifest(manifest: Mapping[str, Any]) -> ModelFiles:
    """The model files a ``.mar`` manifest names (``--model-file``, ``--serialized-file``)."""
    model = manifest.get("model", {}) if isinstance(manifest, Mapping) else {}
    return ModelFiles(model_file=model.get("modelFile"), serialized_file=model.get("serializedFile"))


# -- TorchServe's two calls ------------------------------------------------------------------------


def on_a_worker(context) -> bool:
    """Whether ``context`` is a real TorchServe worker's, not the test kit's fake."""
    return type(context).__module__.startswith("ts.")


def initialize(handler, context) -> None:
    """Start ``handler`` the way the archive says: its model config's ``handler:`` section, the
    device TorchServe assigned, the model files of its manifest, the deadline inside
    ``responseTimeout``. When start-up fails, one :func:`startup_failure_line` is logged (with
    the traceback). On a real worker the worker then stays up in a "cannot start" state: every
    request gets a 503 ``ModelCannotStart`` with that line at once (:func:`answer_cannot_start`).
    Raising would end the worker, and TorchServe restarts it with backoff for minutes, its
    requests waiting meanwhile and the traceback logged at each try. Elsewhere (the test kit) the
    exception is raised."""
    if on_a_worker(context):
        log_with_levels()
    try:
        model_config = context.model_yaml_config or {}
        handler.manifest = context.manifest or {}
        handler.start(
            model_dir=context.system_properties.get("model_dir", "."),
            section=with_pt2(model_config.get(SECTION), model_config.get("pt2")),
            device=device_for(context.system_properties),
            model_files=model_files_from_manifest(handler.manifest),
            server_timeout_s=response_timeout(model_config),
            server_timeout_name="responseTimeout",
        )
        handler._max_response_size, source = max_response_size()
        log.info("answers over %d bytes are refused alone (max_response_size, %s)",
                 handler._max_response_size - RESPONSE_SIZE_HEADROOM, source)
    except Exception as exc:
        line = startup_failure_line(_model_name(context), exc)
        if not on_a_worker(context):
            log.error("%s", line)
            raise
        log.error("%s", line, exc_info=True)
        handler._cannot_start = line


def answer_cannot_start(line: str, data: Sequence[Any], context) -> list:
    """Every request of a batch answered with a 503 ``ModelCannotStart`` whose message is the
    model's one start-up failure ``line`` (and ``Retry-After``), without touching the model."""
    from handlers.engine.errors import ModelCannotStart

    answer = error_answer(ModelCannotStart(line))
    requests = len(getattr(context, "request_processor", None) or data or [None])
    for idx in range(requests):
        context.set_response_status(answer.status, phrase_of(answer.status), idx)
        context.set_response_content_type(idx, JSON)
        for name, value in answer.headers.items():
            context.set_response_header(idx, name, value)
    return [answer.encoded.payload] * len(data or [None])


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def log_with_levels() -> None:
    """Make this package's log records readable in TorchServe's ``model_log.log``. Its worker
    prints every record to stdout as the bare message, and the frontend files all of stdout at
    INFO: a handler's 500 read as INFO. Here each record carries its level and logger, warnings
    and errors go to stderr (filed at WARN), the rest to stdout. Idempotent."""
    logger = logging.getLogger("handlers")
    if any(getattr(h, "microbatch_levels", False) for h in logger.handlers):
        return
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    for stream, level_filter, level in ((sys.stdout, _Below(logging.WARNING), logging.DEBUG),
                                        (sys.stderr, None, logging.WARNING)):
        stream_handler = logging.StreamHandler(stream)
        stream_handler.setLevel(level)
        stream_handler.setFormatter(formatter)
        if level_filter is not None:
            stream_handler.addFilter(level_filter)
        stream_handler.microbatch_levels = True
        logger.addHandler(stream_handler)
    logger.setLevel(logging.INFO)  # 4xx are logged at DEBUG: set handlers' level to DEBUG to see them
    logger.propagate = False


def _model_name(context) -> str:
    name = getattr(context, "model_name", None)
    if not name:
        manifest = getattr(context, "manifest", None) or {}
        name = manifest.get("model", {}).get("modelName") if isinstance(manifest, Mapping) else None
    return str(name or "?")


def handle(handler, data: Sequence[Mapping[str, Any]], context) -> list:
    """Answer one TorchServe batch: exactly one body per request, in order; per-request status,
    Content-Type and ``X-Batch-Size`` written to the context."""
    cannot_start = getattr(handler, "_cannot_start", None)
    if cannot_start is not None:
        return answer_cannot_start(cannot_start, data, context)
    if not handler.initialized:
        raise RuntimeError(f"{type(handler).__name__}.handle() called before initialize()")
    envelope = _calling_envelope()
    # Behind a KServe envelope the rows are the instances of one request (the batch's first):
    # each gets that request's headers. The length test covers other envelopes that join the
    # instances of a batch.
    one_request = _is_kserve(envelope) or len(data) != len(getattr(context, "request_processor", None) or data)
    # TorchServe does not tell the worker when a request reached the frontend: deadlines count
    # from now, later than the client's own (a request is shed only once surely not awaited).
    # Its frontend queue is bounded by jobQueueSize (docs/queueing.md, "Under overload").
    arrived = time.monotonic()
    requests = []
    for idx, row in enumerate(data):
        headers = _headers(context, 0 if one_request else idx)
        requests.append(Request(_body(envelope, row), headers, _request_id(context, idx, one_request),
                                deadline=handler.deadline_for(headers, arrived)))
    if getattr(handler, "_unhealthy_after_last_batch", False):
        _end_worker_if_still_unhealthy(handler, context)
    responses, report = handler.respond(requests)
    responses, report = refuse_oversized(responses, report, getattr(handler, "_max_response_size", None))
    report_metrics(context, report)
    handler._unhealthy_after_last_batch = handler.unhealthy_reason is not None
    if handler._unhealthy_after_last_batch:
        log.error("this worker is unhealthy (%s): it ends itself when the next batch arrives", handler.unhealthy_reason)
    return _write(responses, context, one_request)


def max_response_size(environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """TorchServe's ``max_response_size`` and where it was read. The frontend does not pass it
    to its workers, so it is read where the frontend read it: its config file (``TS_CONFIG_FILE``,
    else the ``-f`` argument of the frontend, the parent that starts this worker), overridden by
    ``TS_MAX_RESPONSE_SIZE`` when that file sets ``enable_envvars_config=true`` (the worker
    inherits the frontend's environment); else TorchServe's default."""
    config = environ.get("TS_CONFIG_FILE") or _frontend_config_file()
    properties = {}
    if config:
        try:
            from ts.model_server import load_properties  # TorchServe's own reader of that file

            properties = load_properties(config)
        except Exception as exc:  # noqa: BLE001 - unreadable: the default, said in the log
            log.warning("could not read TorchServe's config %s (%s): assuming its default max_response_size", config, exc)
    candidates = [("TS_MAX_RESPONSE_SIZE", environ.get("TS_MAX_RESPONSE_SIZE"))] \
        if properties.get("enable_envvars_config", "").lower() == "true" else []
    candidates.append((f"from {config}", properties.get("max_response_size")))
    for source, value in candidates:
        try:
            if value is not None and int(value) > 0:
                return int(value), source
        except ValueError:
            log.warning("max_response_size %r (%s) is not a number of bytes", value, source)
    return DEFAULT_MAX_RESPONSE_SIZE, "TorchServe's default"


def _frontend_config_file() -> Optional[str]:
    """The ``-f <config.properties>`` the TorchServe frontend (this worker's parent) was started
    with, as an absolute path; None elsewhere (no /proc, no such argument)."""
    try:
        proc = Path(f"/proc/{os.getppid()}")
        args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        if "org.pytorch.serve.ModelServer" not in args or "-f" not in args[:-1]:
            return None
        return str(proc.joinpath("cwd").resolve() / args[args.index("-f") + 1])
    except OSError:
        return None


def refuse_oversized(responses: list, report, limit: Optional[int]) -> tuple[list, Any]:
    """Each response whose body is over ``limit`` minus the headroom replaced by a 500
    :class:`ResponseTooLarge` naming its size, the limit and where to raise it (the frontend
    would end the worker, failing the whole batch), and counted as an error in ``report``."""
    if not limit:
        return responses, report
    allowed = limit - RESPONSE_SIZE_HEADROOM
    over = [idx for idx, response in enumerate(responses) if len(response.payload) > allowed]
    if not over:
        return responses, report
    responses, outcomes = list(responses), list(report.outcomes)
    for idx in over:
        size = len(responses[idx].payload)
        error = ResponseTooLarge(f"the answer is {size:,} bytes, over the {allowed:,} bytes this server sends (its "
                                 f"max_response_size, {limit:,}, less {RESPONSE_SIZE_HEADROOM} for framing): raise "
                                 f"max_response_size in TorchServe's config.properties")
        answer = error_answer(error)
        responses[idx] = dataclasses.replace(responses[idx], status=answer.status, body=answer.encoded.value,
                                             content_type=JSON, headers=answer.headers, payload=answer.encoded.payload)
        outcomes[idx] = Failure(error)
    return responses, dataclasses.replace(report, outcomes=outcomes)


def body_of(row: Mapping[str, Any]) -> Any:
    """The payload of one row of TorchServe's own ``data`` list, as it is without an envelope
    (``body`` for raw POSTs, ``data`` for a form field named so; None for a JSON null);
    ``NO_BODY`` when the request had neither."""
    if not isinstance(row, dict) and not isinstance(row, abc.Mapping):  # dict first: the common, cheap case
        return row
    for key in ("body", "data"):
        if row.get(key) is not None:
            return row[key]
    return None if "body" in row or "data" in row else NO_BODY


def report_metrics(context, report) -> None:
    """The batch's metrics (``handlers.core.metrics``) through TorchServe's metric cache. Metrics
    never fail a batch."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    try:
        Dimension = _dimension_class()
        for metric in batch_metrics(report):
            # Fresh lists each call: TorchServe appends its default dimensions to the list it is given.
            dimensions = [Dimension(key, value) for key, value in metric.labels.items()]
            if metric.kind == "ms":
                metrics.add_metric(metric.name, metric.value, "ms", None, dimensions)
            else:
                metrics.add_counter(metric.name, metric.value, None, dimensions)
    except Exception:  # noqa: BLE001 - a metrics bug must not cost the batch its answers
        log.exception("could not report metrics for a batch")


# -- internals -------------------------------------------------------------------------------------

_ENVELOPES = "ts.torch_handler.request_envelope"


def _calling_envelope():
    """The TorchServe request envelope whose ``handle`` this batch came through; None without one."""
    # Ask the caller, not the rows: a KServe v1 request whose one instance is {"body": x} gives
    # the same rows and context as a plain request with body x, and the context keeps no body to
    # compare with. TorchServe (ts/model_loader.py) makes the envelope's bound ``handle`` the
    # entry point, and BaseEnvelope.handle calls ours itself: the envelope is on the call stack.
    # Envelopes load only from TorchServe's package; without its base module there is none.
    base = sys.modules.get(f"{_ENVELOPES}.base")
    if base is None:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "handle" and isinstance(frame.f_locals.get("self"), base.BaseEnvelope):
            return frame.f_locals["self"]
        frame = frame.f_back
    return None


def _is_envelope(envelope, module: str, class_name: str) -> bool:
    loaded = sys.modules.get(f"{_ENVELOPES}.{module}")
    return envelope is not None and loaded is not None and isinstance(envelope, getattr(loaded, class_name))


def _is_kserve(envelope) -> bool:
    """KServe v1 or v2: both read the batch's first request only and answer it with one JSON."""
    return _is_envelope(envelope, "kserve", "KServeEnvelope") or _is_envelope(envelope, "kservev2", "KServev2Envelope")


def _body(envelope, row: Any) -> Any:
    """The body of one row: TorchServe's own row without an envelope (:func:`body_of`); behind
    one, what its ``parse_input`` made of the request: a body or an instance, unchanged whatever
    its type, except a KServe v2 input, whose body is its (reshaped) ``data``."""
    if envelope is None or _is_envelope(envelope, "kservev2", "KServev2Envelope"):
        return body_of(row)
    return row


def _request_id(context, idx: int, one_request: bool) -> Optional[str]:
    """TorchServe's id of request ``idx`` (behind an envelope: the request's id and the instance)."""
    try:
        request_id = context.get_request_id(0 if one_request else idx)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    if request_id is None:
        return None
    return f"{request_id}#{idx}" if one_request else str(request_id)


def _headers(context, idx: int) -> dict:
    try:
        return dict(context.get_all_request_header(idx) or {})
    except (AttributeError, IndexError, TypeError):
        return {}


def _write(responses: list, context, one_request: bool) -> list:
    requests = len(getattr(context, "request_processor", None) or responses)
    for idx in range(requests):
        context.set_response_header(idx, BATCH_SIZE_HEADER, str(requests))
        request_id = _request_id(context, idx, False)
        if request_id is not None:  # the id the worker's log names this request by
            context.set_response_header(idx, REQUEST_ID_HEADER, request_id)
    failures = [(idx, response) for idx, response in enumerate(responses) if response.status != 200]
    if one_request:
        # Behind a KServe envelope the items are the instances of one request: its status is
        # that of the first failed instance; every instance keeps its own answer or error, in
        # the envelope's JSON (even when there is one instance).
        failures = [(0, response) for _, response in failures[:1]]
    for idx in range(requests):
        context.set_response_content_type(idx, JSON if one_request else responses[idx].content_type)
    for idx, response in failures:
        context.set_response_status(response.status, phrase_of(response.status), idx)
        for name, value in response.headers.items():  # e.g. a 503's Retry-After
            context.set_response_header(idx, name, value)
    if one_request:  # the envelope writes the one JSON answer from the values
        return [response.body for response in responses]
    # Bytes, encoded on the pool: TorchServe's worker sends bytes as they are (anything else it
    # encodes again, with json.dumps(indent=2), on its one main thread).
    return [response.payload for response in responses]


def _end_worker_if_still_unhealthy(handler, context) -> None:
    """Called when a batch arrives after one that left the handler unhealthy (a model call hung
    past its deadline, or every stage thread held by a hung stage). That batch was answered; if
    the handler is still unhealthy, end the worker process now, before answering this one, so
    that TorchServe starts a fresh worker.

    Why now and not right after the unhealthy batch's answer: TorchServe fails the batch in
    flight when its worker dies ("Worker died.", 500), but a job it has already polled for its
    next batch when it notices the death is lost for good (its WorkerThread fails only ``req``).
    Ending while this batch is in flight loses nothing."""
    reason = handler.unhealthy_reason
    if reason is None:
        return  # the stuck call returned in time: serve on
    if getattr(context, "cl_socket", None) is None:  # a test kit context: no process to end
        log.error("the handler is unhealthy (%s); no worker process to replace", reason)
        return
    log.critical("ending this worker so that TorchServe starts a fresh one (this batch gets "
                 "TorchServe's 'Worker died.'): %s", reason)
    logging.shutdown()
    os._exit(WORKER_REPLACED_EXIT_CODE)
