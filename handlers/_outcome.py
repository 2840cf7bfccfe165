"""One outcome per request, carried from the first stage to the last: a value or an error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

from ._errors import RequestError


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
    """Run ``stage(*args)``; an exception becomes this request's :class:`Failure`, never a dead
    thread or a lost request."""
    try:
        return Success(stage(*args))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - every error must reach its request (a Rust
        # extension's panic, e.g. the tokenizers' PanicException, is a BaseException)
        error = classify(exc)
        if error is not exc and error.__cause__ is None:
            error.__cause__ = exc  # keeps the traceback for the log of a 5xx
        return Failure(error)
