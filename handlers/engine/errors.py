"""Per-request errors: each carries the HTTP status and a JSON body the client can act on."""

from __future__ import annotations

from http import HTTPStatus

from handlers.engine.settings import ConfigError


class RequestError(Exception):
    """An error that belongs to one request, not to its batch.

    Raise a subclass from a per-request hook (``preprocess_one``, ``postprocess_one``) to give
    that request its own status code; its batch-mates are not affected.

    Example::

        if len(body) > limit:
            raise PayloadTooLarge(f"body is {len(body)} bytes, the limit is {limit}")
    """

    status: int = 500
    kind: str = "InternalServerError"
    # Set when the error is given to a request (handlers.engine.outcome.error_of): its traceback as text
    # (5xx only: for the log, no frames kept), and whether retrying the model on smaller
    # micro-batches may cure it.
    traceback_text: str = ""
    retry_may_cure: bool = True

    def __init__(self, message: str):
        # A hook may pass what it caught (``raise BadRequest(exc)``): the body needs a string.
        message = message if isinstance(message, str) else str(message)
        super().__init__(message)
        self.message = message

    @property
    def phrase(self) -> str:
        """The HTTP reason phrase of :attr:`status`."""
        return phrase_of(self.status)

    @property
    def headers(self) -> dict:
        """Response headers this error adds (e.g. ``Retry-After``)."""
        return {}

    def to_json(self) -> dict:
        """The response body: ``{"code": 400, "type": "BadRequest", "message": "..."}``."""
        return {"code": self.status, "type": self.kind, "message": self.message}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class BadRequest(RequestError):
    """400: the request is malformed (cannot be decoded, wrong shape, bad value)."""

    status = 400
    kind = "BadRequest"


class PayloadTooLarge(RequestError):
    """413: the request is over a size limit (bytes, pixels, tokens)."""

    status = 413
    kind = "PayloadTooLarge"


class UnsupportedMediaType(RequestError):
    """415: the request's content is of a type the handler does not read."""

    status = 415
    kind = "UnsupportedMediaType"


class RequestTimeout(RequestError):
    """408: nobody waits for this answer any more (the client's ``x-request-timeout-seconds``
    passed, or it hung up) and the model had not started on it: answered at once, with no model
    time spent (under overload the model serves requests still awaited). A request dropped on
    the server's own ``request_budget_s`` is a 503 instead (see ``Request.abandoned``)."""

    status = 408
    kind = "RequestTimeout"


class InferenceFailed(RequestError):
    """500: the model raised on this request (found alone by splitting its micro-batch)."""

    status = 500
    kind = "InferenceFailed"


class PostprocessFailed(RequestError):
    """500: turning this request's model output into a response raised."""

    status = 500
    kind = "PostprocessFailed"


class OutOfMemory(RequestError):
    """507: the model ran out of memory on this request even alone."""

    status = 507
    kind = "OutOfMemory"


class DeadlineExceeded(RequestError):
    """504: a stage did not finish before the batch deadline."""

    status = 504
    kind = "DeadlineExceeded"


class InternalError(RequestError):
    """500: a failure of the handler itself, not of this request."""

    status = 500
    kind = "InternalServerError"


class SplitFailed(RequestError):
    """500: the model's output for a micro-batch could not be cut into one part per request
    (``split`` broke its contract, or the output is not batched the way it expects)."""

    status = 500
    kind = "SplitFailed"


class ServiceUnavailable(RequestError):
    """503: the worker cannot take requests now (overloaded, or its model is stuck on an earlier
    batch and the worker is being replaced); the request was not started and can be sent again,
    as its ``Retry-After`` header says."""

    status = 503
    kind = "ServiceUnavailable"
    retry_after_s = 1  # a hint: overload and a worker's replacement pass in seconds

    @property
    def headers(self) -> dict:
        return {"Retry-After": str(self.retry_after_s)}


class ModelCannotStart(ServiceUnavailable):
    """503: this model cannot start (its weights do not load, its self-test refused it, its
    handler file does not import). Its worker or replica stays up and answers every request at
    once with the one line that says why, rather than leaving it waiting for a worker that never
    comes; the model serves again once fixed and deployed again."""

    kind = "ModelCannotStart"
    retry_after_s = 60  # not a passing state: a client should not come back within seconds


class ResponseTooLarge(RequestError):
    """500: this request's answer is over the server's limit on a response's size (TorchServe's
    ``max_response_size``); sent, it would cost its whole batch."""

    status = 500
    kind = "ResponseTooLarge"


def phrase_of(status: int) -> str:
    """The HTTP reason phrase of ``status``; for a code the standard does not name (e.g. 499),
    that of its class: "Client Error" or "Server Error"."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Client Error" if 400 <= status < 500 else "Server Error"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for host or accelerator out-of-memory errors (torch's OOM is matched by name,
    so that the engine needs no torch import)."""
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return "out of memory" in str(exc).lower()


def describe(exc: BaseException) -> str:
    """A one-line account of an exception for a client: its type and message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def preprocess_error(exc: BaseException) -> RequestError:
    """The error a request gets when its preprocessing raised ``exc``.

    A :class:`RequestError` (a 4xx raised on purpose, or by ``parsing_client_data`` around a call
    that parses the client's data) is the request's own answer. Anything else, a ``ValueError``
    included, came from the handler's own code: a 500 :class:`InternalError`, which the engine
    logs with its traceback, never blamed on the client.
    """
    if isinstance(exc, RequestError):
        return exc
    return InternalError(f"preprocessing failed: {describe(exc)}")


def inference_error(exc: BaseException) -> RequestError:
    """The error a request gets when inference raised ``exc`` on it alone."""
    if isinstance(exc, RequestError):
        return exc
    if is_out_of_memory(exc):
        return OutOfMemory(f"the model ran out of memory: {describe(exc)}")
    return InferenceFailed(f"inference failed on this request: {describe(exc)}")


def postprocess_error(exc: BaseException) -> RequestError:
    """The error a request gets when its postprocessing raised ``exc``."""
    if isinstance(exc, RequestError):
        return exc
    return PostprocessFailed(f"postprocessing failed: {describe(exc)}")


# The one line a worker (TorchServe's or a Ray replica) logs when its model cannot start;
# scripts/torchserve_instance.py finds it in TorchServe's log by this prefix and " cannot start: ".
STARTUP_FAILURE_PREFIX = "microbatch-handlers: model "


def startup_failure_line(model_name: str, exc: BaseException) -> str:
    """``microbatch-handlers: model <name> cannot start: <message>``, on one line. A ConfigError's
    message says it all; any other exception is named (``KeyError: 'labels'`` says more than
    ``'labels'``)."""
    # A ConfigError's several problems, one per line, become "; "-separated.
    message = "; ".join(" ".join(line.split()) for line in str(exc).splitlines() if line.strip())
    if not isinstance(exc, ConfigError) or not message:
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return f"{STARTUP_FAILURE_PREFIX}{model_name} cannot start: {message}"
