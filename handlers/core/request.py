"""A request as the per-request hooks see it: its body and headers, nothing shared."""

from __future__ import annotations

import codecs
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

from handlers.engine.errors import BadRequest, RequestTimeout, ServiceUnavailable, UnsupportedMediaType

# How long the client waits for its answer, in seconds from when it sent the request: the header
# Ray Serve's proxy and HAProxy ingress honour; a client or gateway sends it.
TIMEOUT_HEADER = "x-request-timeout-seconds"


class _NoBody:
    def __repr__(self) -> str:
        return "NO_BODY"


# The body of a request that had none (a form post: TorchServe hands over its fields instead);
# distinct from None, which is a JSON null.
NO_BODY = _NoBody()


class Headers(Mapping):
    """A request's headers, looked up without regard to case (``headers["content-type"]`` and
    ``headers["Content-Type"]`` alike), the names kept as sent: Ray Serve lowercases them,
    TorchServe does not, and a hook must read them the same on both."""

    def __init__(self, headers: Mapping[str, str] = ()):
        self._items = {str(name).lower(): (name, value) for name, value in dict(headers).items()}

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


class Deadline(float):
    """A ``time.monotonic()`` instant after which an answer is no longer awaited, and whose limit
    it is: ``by_client`` (its ``x-request-timeout-seconds``) or not (the server's own
    ``request_budget_s``, of ``budget_s`` seconds)."""

    def __new__(cls, at: float, by_client: bool = True, budget_s: float = 0.0):  # defaults: copy and pickle
        deadline = super().__new__(cls, at)
        deadline.by_client, deadline.budget_s = by_client, budget_s
        return deadline


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"the number {text[:40]} is out of range (JSON numbers must be finite)")
    return number


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (RFC 8259 has no NaN or Infinity)")


def parse_json(text: Any) -> Any:
    """Strict JSON (``str`` or bytes): NaN, Infinity and numbers that overflow a float are
    refused with a ``ValueError`` naming them, as a number JSON cannot carry."""
    return json.loads(text, parse_float=_finite, parse_constant=_no_constant)


@dataclass(frozen=True)
class Request:
    """One request of a batch.

    Attributes:
        body: what TorchServe passed: ``bytes``/``bytearray`` for binary bodies, ``str`` for
            ``text/*``, already-decoded JSON (dict, list, number) for ``application/json``.
            A request with no body (a form post) is answered 415 before any hook sees it.
        headers: the request's headers (:class:`Headers`: any case finds a name).
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

    def __post_init__(self):
        if not isinstance(self.headers, Headers):
            object.__setattr__(self, "headers", Headers(self.headers))

    def abandoned(self, now: Optional[float] = None):
        """The error of a request the model has not reached when it is no longer to be served;
        None while it is. Cheap: checked before each stage that costs time. Nobody waits (the
        client hung up, or its own ``x-request-timeout-seconds`` passed): a 408. The server's
        own ``request_budget_s`` passed: a 503 with ``Retry-After``, not a 408 (a client error)
        nor a 504 (a gateway's upstream timing out): the client still waits, the server chose
        to drop the request under load, and sending it again may well succeed."""
        if self.hung_up is not None and self.hung_up.is_set():
            return RequestTimeout("not started: the client closed the connection before the model reached this "
                                  "request; no model time was spent on it")
        if self.deadline is not None:
            late = (time.monotonic() if now is None else now) - self.deadline
            if late >= 0:
                if getattr(self.deadline, "by_client", True):
                    return RequestTimeout(f"not started: the request's deadline passed {late:.3f} s before the "
                                          f"model reached it (its client's {TIMEOUT_HEADER}); no model time was "
                                          f"spent on it")
                return ServiceUnavailable(f"not started: the server's request_budget_s ({self.deadline.budget_s:g} s) "
                                          f"passed {late:.3f} s before the model reached this request (overloaded); "
                                          f"no model time was spent on it: send it again")
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
                return parse_json(self.body)
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
    handler answers alike on every server): ``application/json`` decoded (strict JSON; left as
    bytes when it does not parse, for :meth:`Request.json` to say why), ``text/*`` decoded to
    ``str``, both in the ``charset`` the Content-Type declares (default UTF-8; bytes when not
    in it), anything else bytes.

    Raises:
        UnsupportedMediaType: the declared charset is not one Python knows.
    """
    if not isinstance(body, (bytes, bytearray)) or not content_type:
        return body
    is_json, is_text = content_type.startswith("application/json"), content_type.startswith("text")
    if not (is_json or is_text):
        return body
    charset = charset_of(content_type) or "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        raise UnsupportedMediaType(f"the body's charset {charset!r} (Content-Type: {content_type}) is not one this "
                                   f"server knows: send UTF-8") from None
    try:
        text = bytes(body).decode(charset)
        return parse_json(text) if is_json else text
    except (ValueError, RecursionError):  # UnicodeDecodeError included
        return body


def charset_of(content_type: str) -> Optional[str]:
    """The ``charset`` parameter of a Content-Type (``text/plain; charset="latin-1"``), or None."""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"'):
            return value.strip().strip('"')
    return None


def deadline_of(headers: Mapping[str, str], arrived: float, budget_s: float = 0.0) -> Optional[float]:
    """When the answer to a request that ``arrived`` (``time.monotonic()``) stops being awaited:
    the sooner of its client's ``x-request-timeout-seconds`` (a positive number; anything else is
    ignored, as Ray Serve's proxy does) and the server's ``budget_s`` (0: none), as a
    :class:`Deadline` that says whose it is. None: neither."""
    sent = next((value for key, value in headers.items() if key.lower() == TIMEOUT_HEADER), None)
    timeout = 0.0
    if sent is not None:
        try:
            timeout = float(sent)
        except (TypeError, ValueError):
            pass
        if not (math.isfinite(timeout) and timeout > 0):
            timeout = 0.0
    if timeout and (budget_s <= 0 or timeout <= budget_s):  # a tie is the client's: nobody waits
        return Deadline(arrived + timeout, by_client=True)
    return Deadline(arrived + budget_s, by_client=False, budget_s=budget_s) if budget_s > 0 else None
