"""One outcome per request, carried from the first stage to the last: a value or an error."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable, Union

from handlers.engine.errors import RequestError


@dataclass(frozen=True)
class Success:
    """The request's stage produced ``value``."""

    value: Any

    ok = True


@dataclass(frozen=True)
class Failure:
    """The request failed with ``error``; later stages skip it."""

    error: RequestError

    ok = False


Outcome = Union[Success, Failure]


def attempt(stage: Callable[..., Any], classify: Callable[[BaseException], RequestError], *args) -> Outcome:
    """Run ``stage(*args)``; whatever it raises becomes this request's :class:`Failure`, never a
    dead thread or a lost request: ``SystemExit`` from a library's ``exit()`` and a Rust
    extension's panic (``BaseException``\\ s both) included."""
    try:
        return Success(stage(*args))
    except BaseException as exc:  # noqa: BLE001 - every error must reach its request
        return Failure(error_of(exc, classify))


def error_of(exc: BaseException, classify: Callable[[BaseException], RequestError]) -> RequestError:
    """The request's error for ``exc``. A 5xx keeps the traceback as text (``traceback_text``,
    for the log); no frame is kept: the frames of a failed model call hold its tensors, on a GPU
    the very memory that a retry on a smaller micro-batch needs."""
    error = classify(exc)
    if error.status >= 500:
        error.traceback_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    for held in {id(exc): exc, id(error): error}.values():
        held.__traceback__ = None
        held.__cause__ = held.__context__ = None
    return error
