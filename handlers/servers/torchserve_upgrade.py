"""A TorchServe handler class, unchanged, run by the micro-batch engine: ``upgrade(MyHandler)``.

A subclass of TorchServe's ``BaseHandler`` has three batch-wide hooks: ``preprocess(data)`` (all
rows of the batch → one input), ``inference(input)`` and ``postprocess(output)`` (one answer per
row). :class:`Microbatched` runs them as the engine's hooks:

- ``preprocess`` per request, on the pool, called with a one-row batch ``[row]``; its result (a
  tensor of leading size 1, a dict or tuple of such, or a list of one) is that request's item, and
  a micro-batch is those items joined (``torch.cat``; lists concatenated);
- ``inference`` on each micro-batch;
- ``postprocess`` per request, on that request's part of the output (leading size 1 again), which
  must give one answer.

Evidence decides whether ``preprocess`` is row by row: a one-row result whose leading size is not
1, or two rows preprocessed together that differ from the two one-row results joined (checked
once, on the first two requests of unlike items: the shipped samples, else live traffic), switch
the handler for good to calling ``preprocess`` on each micro-batch's rows; a request that makes
that call fail is found by splitting the micro-batch (``handlers.engine.model_call``).

TorchServe's start-up is kept: the handler's own ``initialize(context)`` loads the model and sets
``self.context``, ``self.manifest``, ``self.device``, ``self.model``; then the engine starts
around its hooks (settings from the ``handler:`` section, the self-test on shipped samples).
"""

from __future__ import annotations

import binascii
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from handlers.core.handler import MicroBatchHandler
from handlers.core.request import Request
from handlers.engine.errors import BadRequest, PayloadTooLarge, PostprocessFailed, RequestError, describe

log = logging.getLogger(__name__)

# Two rows preprocessed together are the two one-row results joined, within this (float noise).
RTOL, ATOL = 1e-5, 1e-6


@dataclass(frozen=True)
class Prepared:
    """One request's item: its TorchServe row and, when ``preprocess`` runs row by row, the
    one-row result (None when the micro-batch's rows are preprocessed together)."""

    value: Any
    row: Any


class RequestFailed(RequestError):
    """A TorchServe ``PredictionException`` raised for one request: its ``error_code`` is the status."""

    kind = "PredictionException"

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status if isinstance(status, int) and 400 <= status <= 599 else 500


def _own_status(exc: BaseException) -> BaseException:
    """A TorchServe ``PredictionException`` as a :class:`RequestFailed` with its status; other errors as they are."""
    code = getattr(exc, "error_code", None)
    if type(exc).__name__ == "PredictionException" and code is not None:
        return RequestFailed(str(getattr(exc, "message", exc)), code)
    return exc


# What TorchServe's own handlers raise when a request's bytes are not what they parse: the
# client's 400 (413 for a decompression bomb). Only these: any other exception of a hook is the
# handler's bug, a 500, never blamed on the client.
_CLIENT_DATA_ERRORS = (json.JSONDecodeError, UnicodeDecodeError, binascii.Error)


def _preprocess_status(exc: BaseException) -> BaseException:
    """:func:`_own_status`, and a parser's refusal of the request's data as that request's 4xx:
    an image Pillow cannot read (``UnidentifiedImageError``, or an ``OSError``/``ValueError``
    raised inside Pillow, e.g. a truncated file), JSON, UTF-8 or base64 that does not decode."""
    exc = _own_status(exc)
    if isinstance(exc, RequestError):
        return exc
    if type(exc).__name__ == "DecompressionBombError" and _raised_in_pillow(exc):
        return PayloadTooLarge(f"the image is too large: {describe(exc)}")
    if isinstance(exc, _CLIENT_DATA_ERRORS) or (
            isinstance(exc, (OSError, ValueError, SyntaxError)) and _raised_in_pillow(exc)):
        return BadRequest(f"the request's data could not be read: {describe(exc)}")
    return exc


def _raised_in_pillow(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by Pillow's own code (its innermost frame is in the PIL package)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module == "PIL" or module.startswith("PIL.")


def leading_one(value: Any) -> bool:
    """Whether ``value`` is one row of a batch: a tensor of leading size 1, a list of one, a dict or
    tuple whose every field is one row."""
    if isinstance(value, torch.Tensor):
        return value.dim() >= 1 and value.shape[0] == 1
    if isinstance(value, list):
        return len(value) == 1
    if isinstance(value, dict):
        return bool(value) and all(leading_one(v) for v in value.values())
    if isinstance(value, tuple):
        return bool(value) and all(leading_one(v) for v in value)
    return False


def joined(values: Sequence[Any]) -> Any:
    """One-row results joined into one batch, field by field (see :func:`leading_one`)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(values))
    if isinstance(first, list):
        return [row for value in values for row in value]
    if isinstance(first, dict):
        return type(first)((key, joined([value[key] for value in values])) for key in first)
    fields = [joined([value[idx] for value in values]) for idx in range(len(first))]
    return type(first)(*fields) if hasattr(first, "_fields") else type(first)(fields)


def same(a: Any, b: Any) -> bool:
    """Equal structures with equal (within RTOL/ATOL) tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return False
        if a.is_floating_point() or b.is_floating_point():
            return torch.allclose(a.float().cpu(), b.float().cpu(), rtol=RTOL, atol=ATOL, equal_nan=True)
        return torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable: not the same
        return False


def one_row(part: Any) -> Any:
    """One request's part of the output, given back its leading dimension of 1 (as ``postprocess``
    saw it on a one-row batch): tensors unsqueezed, anything else as a list of one."""
    if isinstance(part, torch.Tensor):
        return part.unsqueeze(0)
    if isinstance(part, dict) and part and all(isinstance(v, torch.Tensor) for v in part.values()):
        return type(part)((k, v.unsqueeze(0)) for k, v in part.items())
    if isinstance(part, tuple) and part and all(isinstance(v, torch.Tensor) for v in part):
        fields = [v.unsqueeze(0) for v in part]
        return type(part)(*fields) if hasattr(part, "_fields") else type(part)(fields)
    return [part]


class RowByRow:
    """The one owner of "is ``preprocess`` row by row?": assumed until evidence says otherwise,
    then whole micro-batches for good. Evidence: a one-row result that is not one row, or two
    unlike rows preprocessed together differing from their one-row results joined."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reason: Optional[str] = None  # why the micro-batch's rows are preprocessed together
        self._first: Optional[Prepared] = None
        self._checked = False

    @property
    def proven_not(self) -> bool:
        return self.reason is not None

    def refute(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
                log.warning("preprocess is not row by row (%s): from now on it is called on each micro-batch's "
                            "rows together", reason)

    def pair_to_check(self, item: Prepared) -> Optional[tuple]:
        """The first two unlike items seen, once (the caller checks them), else None."""
        with self._lock:
            if self._checked or self.reason is not None:
                return None
            if self._first is None:
                self._first = item
                return None
            if same(self._first.row, item.row):
                return None  # like rows prove nothing (a batch mean of two copies is each)
            self._checked = True
            first, self._first = self._first, None
            return first, item


class Microbatched(MicroBatchHandler):
    """Put first in a TorchServe handler's bases (or use :func:`upgrade`): its ``preprocess``,
    ``inference`` and ``postprocess`` then run per request and per micro-batch, with errors per
    request. ``initialize(context)`` is the handler's own (model, ``self.context``, ``self.manifest``,
    ``self.device``), followed by the engine's start-up.

    Example::

        from handlers import Microbatched

        class MyHandler(Microbatched, MyTorchServeHandler):
            pass
    """

    # TorchServe's own key: ts.handler_utils.timer.timed times the hooks when it is true.
    options = {"profile": False}

    def __init__(self):
        super(MicroBatchHandler, self).__init__()  # the TorchServe handler's own attributes
        context = getattr(self, "context", None)
        MicroBatchHandler.__init__(self)
        self.context = context
        self._row_by_row = RowByRow()
        # Whether inference returns a list, one entry per row (torchvision's detection models: a
        # dict per image): postprocess then gets a list of this request's entry, as on stock.
        # A property of the model, set by each micro-batch's inference before its postprocess.
        self._list_output = False

    # -- TorchServe's calls -------------------------------------------------------------------

    def initialize(self, context) -> None:
        """TorchServe's start-up: the handler's own ``initialize`` (run by :meth:`load_model`) and
        the engine's (settings, self-test, pools)."""
        self.context = context
        super().initialize(context)

    def handle(self, data: Sequence[Any], context) -> list:
        """One TorchServe batch, micro-batched with errors per request; a batch whose first
        request asks to ``describe`` or ``explain`` goes to the handler's own ``handle``, whole."""
        self.context = context  # TorchServe's habit: its hooks read headers and metrics here
        legacy = super(MicroBatchHandler, self)
        if self._asks(context, "describe") or self._asks(context, "explain"):
            return legacy.handle(data, context)
        started = time.time()
        answers = super().handle(data, context)
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            try:
                metrics.add_time("HandlerTime", round((time.time() - started) * 1000, 2), None, "ms")
            except Exception:  # noqa: BLE001 - metrics never fail a batch
                log.debug("HandlerTime not reported", exc_info=True)
        return answers

    @staticmethod
    def _asks(context, header: str) -> bool:
        try:
            return context.get_request_header(0, header) == "True"
        except (AttributeError, IndexError, KeyError, TypeError):
            return False

    # -- the engine's hooks, made of TorchServe's -----------------------------------------------

    def load_model(self, model_dir: str, device: torch.device) -> Any:
        """The handler's own ``initialize(context)`` loads the model; the device stays the one
        the engine chose (the same rule: TorchServe's ``gpu_id``, else the CPU)."""
        ours = self.device
        super(MicroBatchHandler, self).initialize(self.context)
        theirs, self.device, self.initialized = self.device, ours, False
        if theirs is not None and torch.device(theirs) != ours:
            log.warning("the handler's initialize chose %s; the engine runs on %s", theirs, ours)
        return self.model

    def preprocess_one(self, request: Request) -> Prepared:
        """``preprocess([row])`` for this request alone; only the row once ``preprocess`` is
        known not to be row by row."""
        row = {"body": request.body, "data": request.body}  # TorchServe's keys: raw body, form field
        if self._row_by_row.proven_not:
            return Prepared(None, row)
        try:
            value = self.preprocess([row])
        except Exception as exc:  # noqa: BLE001 - the request's own error, with its own status
            raise _preprocess_status(exc) from exc
        if not leading_one(value):
            self._row_by_row.refute(f"preprocess([row]) gave {_shape_of(value)}, not one row")
            return Prepared(None, row)
        item = Prepared(value, row)
        pair = self._row_by_row.pair_to_check(item)
        if pair is not None:
            self._check_pair(*pair)
        return item

    def _check_pair(self, first: Prepared, second: Prepared) -> None:
        try:
            together = self.preprocess([first.row, second.row])
            apart = joined([first.value, second.value])
        except Exception as exc:  # noqa: BLE001 - no evidence either way: stay row by row
            log.info("preprocess on two rows could not be compared with its one-row results (%s: %s)",
                     type(exc).__name__, exc)
            return
        if not same(together, apart):
            self._row_by_row.refute("preprocess on two rows differs from its one-row results joined")

    def collate(self, items: list) -> Any:
        """The one-row results joined; or, when ``preprocess`` is not row by row, ``preprocess``
        on the micro-batch's rows (a failing request is found by splitting the micro-batch)."""
        if self._row_by_row.proven_not or any(item.value is None for item in items):
            try:
                return self.preprocess([item.row for item in items])
            except Exception as exc:  # noqa: BLE001 - its own status for a lone request
                raise _preprocess_status(exc) from exc
        return joined([item.value for item in items])

    def infer(self, batch: Any) -> Any:
        """The handler's own ``inference``."""
        output = self.inference(batch)
        self._list_output = isinstance(output, list)
        return output

    def postprocess_one(self, output: Any, item: Any) -> Any:
        """The handler's own ``postprocess`` on this request's part (leading size 1; a list of
        its one entry when ``inference`` returns a list): its one answer."""
        try:
            answers = self.postprocess([output] if self._list_output else one_row(output))
        except Exception as exc:  # noqa: BLE001 - its own status, if it gave one
            raise _own_status(exc) from exc
        if not isinstance(answers, (list, tuple)) or len(answers) != 1:
            raise PostprocessFailed(f"{type(self).__name__}.postprocess must return one answer per row: it returned "
                                    f"{_shape_of(answers)} for one request")
        return answers[0]


def _shape_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def upgrade(handler_class: type) -> type:
    """A TorchServe handler class (a ``BaseHandler`` subclass) run by the micro-batch engine,
    its hooks unchanged: ``MyHandler = upgrade(MyTorchServeHandler)``. See :class:`Microbatched`.

    Raises TypeError for a class without ``preprocess``, ``inference`` and ``postprocess``."""
    if not isinstance(handler_class, type):
        raise TypeError(f"upgrade() takes a handler class, got {handler_class!r}")
    if issubclass(handler_class, Microbatched):
        return handler_class
    missing = [name for name in ("initialize", "preprocess", "inference", "postprocess")
               if not callable(getattr(handler_class, name, None))]
    if missing:
        raise TypeError(f"upgrade() takes a TorchServe handler class (a ts.torch_handler.base_handler.BaseHandler "
                        f"subclass); {handler_class.__name__} has no {', '.join(missing)}")
    own_handle = next((klass for klass in handler_class.__mro__ if "handle" in vars(klass)), None)
    if own_handle is not None and own_handle.__module__ != "ts.torch_handler.base_handler":
        log.warning("%s.handle is replaced by the micro-batch engine's: its preprocess, inference and postprocess "
                    "are what run", own_handle.__name__)
    # Defined in the caller's module: TorchServe (and handlers.archive) take the one class a
    # handler file defines, so `MyHandler = upgrade(MyHandler)` there is that class, whether
    # MyHandler was imported or defined above (the name rebound leaves one class).
    module = sys._getframe(1).f_globals.get("__name__", handler_class.__module__)
    return type(handler_class.__name__, (Microbatched, handler_class),
                {"__module__": module, "__qualname__": handler_class.__qualname__, "__doc__": handler_class.__doc__})
