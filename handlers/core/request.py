"""A request as the per-request hooks see it: its body and headers, nothing shared."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from handlers.engine.errors import BadRequest, RequestTimeout

# How long the client waits for its answer, in seconds from when it sent the request: the header
# Ray Serve's proxy and HAProxy ingress honour; a client or gateway sends it.
TIMEOUT_HEADER = "x-request-timeout-seconds"


class _NoBody:
    def __repr__(self) -> str:
        return "NO_BODY"


# The body of a request that had none (a form post: TorchServe hands over its fields instead);
# distinct from None, which is a JSON null.
NO_BODY = _NoBody()


@dataclass(frozen=True)
class Request:
    """One request of a batch.

    Attributes:
        body: what TorchServe passed: ``bytes``/``bytearray`` for binary bodies, ``str`` for
            ``text/*``, already-decoded JSON (dict, list, number) for ``application/json``.
            A request with no body (a form post) is answered 415 before any hook sees it.
        headers: the request's headers (names as the client sent them).
        id: the server's id of the request (TorchServe's request id, Ray Serve's
            ``x-request-id``), named in the logs and sent back as ``X-Request-Id``; None in tests.
        deadline: the ``time.monotonic()`` instant after which nobody waits for the answer (the
            client's timeout or the handler's ``request_budget_s``; see :func:`deadline_of`);
            None: no deadline.
        hung_up: set by the server adapter when the client closes the connection.
    """

    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)
    id: Optional[str] = None
    deadline: Optional[float] = None
    hung_up: Optional[threading.Event] = field(default=None, compare=False, repr=False)

    def abandoned(self, now: Optional[float] = None) -> Optional[RequestTimeout]:
        """The 408 for a request nobody waits for any more (its deadline passed, or its client
        hung up); None while somebody does. Cheap: checked before each stage that costs time."""
        if self.hung_up is not None and self.hung_up.is_set():
            return RequestTimeout("not started: the client closed the connection before the model reached this "
                                  "request; no model time was spent on it")
        if self.deadline is not None:
            late = (time.monotonic() if now is None else now) - self.deadline
            if late >= 0:
                return RequestTimeout(f"not started: the request's deadline passed {late:.3f} s before the model "
                                      f"reached it (its client's {TIMEOUT_HEADER}, or the handler's request_budget_s); "
                                      f"no model time was spent on it")
        return None

    def header(self, name: str, default: str | None = None) -> str | None:
        """A header's value, matched without regard to case."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return default

    def json(self) -> Any:
        """The body as JSON; raises :class:`BadRequest` when it is not JSON.

        TorchServe has already decoded ``application/json`` bodies (a JSON string arrives as a
        ``str``); anything else still in bytes or text is parsed here."""
        already_decoded = (self.header("Content-Type") or "").startswith("application/json")
        if isinstance(self.body, (bytes, bytearray, str)) and not (already_decoded and isinstance(self.body, str)) \
                and not self.body.strip():
            raise BadRequest("the body is empty: expected JSON")
        if isinstance(self.body, (bytes, bytearray)) or (isinstance(self.body, str) and not already_decoded):
            try:
                return json.loads(self.body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadRequest(f"the body is not valid JSON: {exc}") from None
            except RecursionError:
                raise BadRequest("the body is not valid JSON: nested too deeply") from None
        return self.body

    def bytes(self) -> bytes:
        """The body as bytes (JSON bodies are re-encoded, text is UTF-8 encoded)."""
        if isinstance(self.body, (bytes, bytearray)):
            return bytes(self.body)
        if isinstance(self.body, str):
            return self.body.encode("utf-8")
        return json.dumps(self.body).encode("utf-8")


def decoded_body(body: Any, content_type: Optional[str]) -> Any:
    """A raw HTTP body as the handlers see it (as TorchServe's worker hands it over, so that a
    handler answers alike on every server): ``application/json`` decoded (left as bytes when it
    does not parse), ``text/*`` decoded to ``str`` (bytes when not UTF-8), anything else bytes."""
    if not isinstance(body, (bytes, bytearray)) or not content_type:
        return body
    try:
        if content_type.startswith("application/json"):
            return json.loads(bytes(body).decode("utf-8"))
        if content_type.startswith("text"):
            return bytes(body).decode("utf-8")
    except (ValueError, RecursionError):
        pass
    return body


def deadline_of(headers: Mapping[str, str], arrived: float, budget_s: float = 0.0) -> Optional[float]:
    """When the answer to a request that ``arrived`` (``time.monotonic()``) stops being awaited:
    the sooner of its client's ``x-request-timeout-seconds`` (a positive number; anything else is
    ignored, as Ray Serve's proxy does) and the server's ``budget_s`` (0: none). None: neither."""
    limits = [budget_s] if budget_s > 0 else []
    sent = next((value for key, value in headers.items() if key.lower() == TIMEOUT_HEADER), None)
    if sent is not None:
        try:
            timeout = float(sent)
        except (TypeError, ValueError):
            timeout = 0.0
        if math.isfinite(timeout) and timeout > 0:
            limits.append(timeout)
    return arrived + min(limits) if limits else None
