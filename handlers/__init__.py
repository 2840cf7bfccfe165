"""microbatch-handlers: TorchServe handlers with parallel preprocessing, pipelined micro-batch
inference and per-request errors.

Subclass :class:`MicroBatchHandler` for a TorchServe handler; use :class:`BatchEngine` alone for
the batching engine (it needs neither TorchServe nor torch). ``handlers.testing`` holds a fake
TorchServe context for unit tests.
"""

from ._engine import BatchEngine, BatchReport, plan_micro_batches
from ._errors import (
    BadRequest,
    DeadlineExceeded,
    InferenceFailed,
    InternalError,
    OutOfMemory,
    PayloadTooLarge,
    PostprocessFailed,
    RequestError,
    UnsupportedMediaType,
)
from ._outcome import Failure, Success
from ._request import Request
from ._settings import ConfigError, EngineSettings, read_settings

__all__ = [
    "BadRequest",
    "BatchEngine",
    "BatchReport",
    "ConfigError",
    "DeadlineExceeded",
    "EngineSettings",
    "Failure",
    "InferenceFailed",
    "InternalError",
    "MicroBatchHandler",
    "OutOfMemory",
    "PayloadTooLarge",
    "PostprocessFailed",
    "Request",
    "RequestError",
    "Success",
    "UnsupportedMediaType",
    "plan_micro_batches",
    "read_settings",
]


def __getattr__(name):
    # The adapter imports torch; load it on first use so that the engine imports without torch.
    if name == "MicroBatchHandler":
        from ._torchserve import MicroBatchHandler

        return MicroBatchHandler
    raise AttributeError(f"module 'handlers' has no attribute {name!r}")
