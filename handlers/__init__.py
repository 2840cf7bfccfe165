"""microbatch-handlers: TorchServe and Ray Serve handlers with parallel preprocessing, pipelined
micro-batch inference and per-request errors.

What a handler author needs is here: the base and ready-made handlers, the :class:`Request` a
hook reads and the :class:`Response` a server sends, the client errors a hook raises (and
:func:`parsing_client_data` to turn a parser's errors into them), the settings, and the input
parsers. ``handlers.testing`` holds the test kit (a local server, a fake TorchServe context,
checks of the batch contract). The engine's internals live in private modules.
"""

import importlib
import warnings

from ._client_data import parsing_client_data
from ._errors import BadRequest, PayloadTooLarge, RequestError, UnsupportedMediaType
from ._request import Request
from ._settings import ConfigError, EngineSettings, ModelFiles
from ._sizing import MicroBatchSizing, register_sizing

# Names whose modules import torch, numpy or Pillow: loaded on first use, so that importing the
# package costs nothing until a handler is used.
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

# Engine internals that were public before 0.13: still importable from here, with a warning,
# for one release.
_MOVED = {
    "BatchEngine": "._engine",
    "BatchReport": "._engine",
    "plan_micro_batches": "._engine",
    "Failure": "._outcome",
    "Success": "._outcome",
    "read_settings": "._torchserve",
    "DeadlineExceeded": "._errors",
    "InferenceFailed": "._errors",
    "InternalError": "._errors",
    "OutOfMemory": "._errors",
    "PostprocessFailed": "._errors",
    "ServiceUnavailable": "._errors",
    "SplitFailed": "._errors",
}

__all__ = sorted([
    "BadRequest",
    "ConfigError",
    "EngineSettings",
    "MicroBatchSizing",
    "ModelFiles",
    "PayloadTooLarge",
    "Request",
    "RequestError",
    "UnsupportedMediaType",
    "parsing_client_data",
    "register_sizing",
    *_LAZY,
])


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in _MOVED:
        module = f"handlers{_MOVED[name]}"
        warnings.warn(f"handlers.{name} is an engine internal and leaves the public API in the next release; "
                      f"import it from {module} (a private module) if you must", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name], __name__), name)
    raise AttributeError(f"module 'handlers' has no attribute {name!r}")
