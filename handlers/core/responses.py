"""Responses as clients read them: strict JSON (RFC 8259 has no NaN or Infinity) and a
Content-Type for each, encoded once to the bytes that go out. Pure functions; they run on the
pool, per request, so that a server's main thread or event loop only forwards bytes."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import abc
from typing import Any

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"


@dataclasses.dataclass(frozen=True)
class Encoded:
    """An answer as it goes out: ``payload``, the bytes of the HTTP body, and its Content-Type;
    ``value``, the same answer as JSON values, ``str`` or ``bytes`` (for a server that wraps it,
    such as a KServe envelope, and for tests)."""

    value: Any
    payload: bytes
    content_type: str


@dataclasses.dataclass(frozen=True)
class RawAnswer:
    """An answer sent as these bytes with this Content-Type (a PNG, a WAV, a CSV), on every
    server: what ``postprocess_one`` returns when plain ``bytes`` (``application/octet-stream``)
    would not say what they are.

    Example::

        def postprocess_one(self, output, item):
            return RawAnswer(png_bytes(output), "image/png")

    Raises:
        TypeError: ``data`` is not bytes, or ``content_type`` not a string.
        ValueError: ``content_type`` is not one header value (``type/subtype[; parameters]``).
    """

    data: bytes
    content_type: str

    def __post_init__(self):
        if not isinstance(self.data, (bytes, bytearray, memoryview)):
            raise TypeError(f"RawAnswer.data must be bytes, got {type(self.data).__name__}")
        if not isinstance(self.content_type, str):
            raise TypeError(f"RawAnswer.content_type must be a string, got {type(self.content_type).__name__}")
        kind = self.content_type.split(";")[0].strip()
        if kind.count("/") != 1 or not all(kind.split("/")) or any(c in self.content_type for c in "\r\n\0"):
            raise ValueError(f"RawAnswer.content_type must be a media type such as 'image/png', got "
                             f"{self.content_type!r}")
        object.__setattr__(self, "data", bytes(self.data))


def encoded(value: Any) -> Encoded:
    """``value`` encoded once, to the bytes a client receives: a :class:`RawAnswer`'s bytes with
    its Content-Type, ``bytes`` as they are (binary), ``str`` as UTF-8 text, anything else as
    strict JSON (see :func:`json_ready`).

    Raises:
        TypeError: a part of ``value`` has no JSON form.
    """
    if isinstance(value, RawAnswer):
        return Encoded(value.data, value.data, value.content_type)
    if isinstance(value, (bytes, bytearray)):
        return Encoded(value, bytes(value), BINARY)
    if isinstance(value, str):
        return Encoded(value, value.encode("utf-8"), TEXT)
    if not _holds_named_tuple(value):
        try:  # C speed, and the only encoding: most answers are already strict JSON
            return Encoded(value, json.dumps(value, allow_nan=False).encode("utf-8"), JSON)
        except (TypeError, ValueError):
            pass
    strict = _strict(value, "response")
    return Encoded(strict, json.dumps(strict, allow_nan=False).encode("utf-8"), JSON)


def json_ready(value: Any) -> Any:
    """``value`` as a response body: ``bytes`` and ``str`` as they are; anything else as a value
    that strict JSON can encode. Tensors and numpy arrays become lists, numpy scalars numbers,
    tuples lists, dataclasses and named tuples objects, and a non-finite float (NaN, ±Infinity)
    becomes ``null``: a number JSON cannot carry is reported as "no number".

    Raises:
        TypeError: a part of ``value`` has no JSON form (the request then gets a 500 that says so).
    """
    return encoded(value).value


def content_type(value: Any) -> str:
    """The Content-Type of a body returned by :func:`json_ready`."""
    if isinstance(value, (bytes, bytearray)):
        return BINARY
    if isinstance(value, str):
        return TEXT
    return JSON


def _strict(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # torch tensors, numpy arrays and scalars
        return _strict(value.tolist(), path)
    if isinstance(value, abc.Mapping):
        return {_key(key, path): _strict(child, f"{path}[{key!r}]") for key, child in value.items()}
    if hasattr(type(value), "_fields") and isinstance(value, tuple):  # a named tuple: an object
        return {name: _strict(child, f"{path}.{name}") for name, child in zip(type(value)._fields, value)}
    if isinstance(value, (list, tuple)):
        return [_strict(child, f"{path}[{i}]") for i, child in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _strict(getattr(value, f.name), f"{path}.{f.name}") for f in dataclasses.fields(value)}
    raise TypeError(
        f"{path} is a {type(value).__name__}, which has no JSON form: postprocess_one must return JSON "
        f"values (dict, list, str, numbers, bool, None, tensors, numpy arrays), str or bytes"
    )


def _key(key: Any, path: str) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)
    raise TypeError(f"{path} has a key of type {type(key).__name__}; JSON object keys are strings")


def _holds_named_tuple(value: Any) -> bool:
    """json.dumps writes a named tuple as an array; it is an object here, whatever its leaves."""
    if isinstance(value, tuple):
        return hasattr(type(value), "_fields") or any(_holds_named_tuple(child) for child in value)
    if isinstance(value, list):
        return any(isinstance(child, (list, tuple, dict)) and _holds_named_tuple(child) for child in value)
    if isinstance(value, dict):
        return any(_holds_named_tuple(child) for child in value.values())
    return False


@dataclasses.dataclass(frozen=True)
class ErrorAnswer:
    """A request's error as it goes out: status, reason phrase, JSON body and extra headers."""

    status: int
    phrase: str
    encoded: Encoded
    headers: dict


def error_answer(error) -> ErrorAnswer:
    """The one place an error becomes a response, per request: ``{"code", "type", "message"}``
    with its status and headers. Never raises: a hook's error whose status is not an HTTP error
    (400..599), or whose body cannot be encoded, is the handler's bug, answered as a 500 that
    says so, to this request alone."""
    from handlers.engine.errors import InternalError, describe

    try:
        status = error.status
        if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
            raise ValueError(f"{type(error).__name__}.status is {status!r}; a RequestError's status must be "
                             f"an HTTP error code, 400..599")
        body = error.to_json()
        return ErrorAnswer(status, error.phrase, Encoded(body, json.dumps(body, allow_nan=False).encode("utf-8"), JSON),
                           dict(error.headers))
    except Exception as exc:  # noqa: BLE001 - the answer of one request must not fail its batch
        try:
            reason = describe(exc)
        except Exception:  # noqa: BLE001 - even describing it failed: name it only
            reason = type(exc).__name__
        fallback = InternalError(f"the handler's error answer could not be built: {reason}")
        body = fallback.to_json()
        return ErrorAnswer(500, fallback.phrase, Encoded(body, json.dumps(body).encode("utf-8"), JSON), {})
