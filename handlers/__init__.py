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
    ServiceUnavailable,
    SplitFailed,
    UnsupportedMediaType,
)
from ._outcome import Failure, Success
from ._request import Request
from ._settings import ConfigError, EngineSettings, ModelFiles
from ._sizing import MicroBatchSizing, register_sizing
from ._torchserve import read_settings

# Names whose modules import torch, numpy or Pillow: loaded on first use, so that the engine
# imports with none of them.
_LAZY = {
    "MicroBatchHandler": "._core",
    "Response": "._core",
    "ImageClassifierHandler": "._image_handler",
    "TensorHandler": "._tensor_handler",
    "TextHandler": "._text_handler",
    "SentenceEmbeddingHandler": "._text_handler",
    "TextClassifierHandler": "._text_handler",
    "ImageGeometry": "._images",
    "ImageLimits": "._images",
    "decode_image": "._images",
    "TensorSpec": "._tensors",
    "parse_array": "._tensors",
    "pad_to_longest": "._text",
    "request_text": "._text",
}

__all__ = sorted([
    "BadRequest",
    "BatchEngine",
    "BatchReport",
    "ConfigError",
    "DeadlineExceeded",
    "EngineSettings",
    "Failure",
    "InferenceFailed",
    "InternalError",
    "MicroBatchSizing",
    "ModelFiles",
    "OutOfMemory",
    "PayloadTooLarge",
    "PostprocessFailed",
    "Request",
    "RequestError",
    "ServiceUnavailable",
    "SplitFailed",
    "Success",
    "UnsupportedMediaType",
    "plan_micro_batches",
    "read_settings",
    "register_sizing",
    *_LAZY,
])


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'handlers' has no attribute {name!r}")
