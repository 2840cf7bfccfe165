"""Calls that parse a client's data (an image decoder, a tokenizer, numpy on a client's JSON):
whatever such a call raises is that request's own 4xx, never a 500."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from handlers.engine.errors import BadRequest, PayloadTooLarge, RequestError, describe

MESSAGE_LIMIT = 300  # characters of the parser's own message passed on to the client


@contextmanager
def parsing_client_data(what: str, too_large: tuple = ()) -> Iterator[None]:
    """Run a block that parses a client's data: what it raises is the client's 400.

    Wrap only the calls that read the client's bytes or text, so that a bug elsewhere still
    shows as a 500. A :class:`RequestError` passes through unchanged, and so does ``MemoryError``
    (the server ran short, not the request's fault). An exception of a type in ``too_large``
    becomes a 413. Rust libraries' ``PanicException`` (a ``BaseException``, e.g. from
    ``tokenizers``) counts as a parse error too: nothing else would catch it per request.

    Example::

        with parsing_client_data("the image data is corrupt or truncated"):
            image.load()
    """
    try:
        yield
    except (RequestError, MemoryError):
        raise
    except too_large as exc:
        raise PayloadTooLarge(f"{what}: {_brief(exc)}") from exc
    except BaseException as exc:  # noqa: BLE001 - re-raised below unless it is a parse error
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit, GeneratorExit: not the client's doing
        raise BadRequest(f"{what}: {_brief(exc)}") from exc


def _brief(exc: BaseException) -> str:
    text = describe(exc)
    if type(exc).__name__ in ("error", "Error"):  # struct.error, zlib.error: name the module too
        text = f"{type(exc).__module__}.{text}"
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."
