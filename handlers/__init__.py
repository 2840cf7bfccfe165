"""microbatch-handlers: TorchServe and Ray Serve handlers with parallel preprocessing, pipelined
micro-batch inference and per-request errors.

What a handler author needs is here: the base and ready-made handlers, the :class:`Request` a
hook reads and the :class:`Response` a server sends, the client errors a hook raises (and
:func:`parsing_client_data` to turn a parser's errors into them), the settings, and the input
parsers. ``handlers.testing`` holds the test kit (a local server, a fake TorchServe context,
checks of the batch contract). Everything else is internal, laid out by part (docs/architecture.md):
``handlers.engine`` (the torch-free batch engine), ``handlers.core`` (the handler core),
``handlers.ready_made`` (ready-made handlers and their input parsers), ``handlers.servers`` (one
adapter per server) and ``handlers.packaging`` (archiver configs to archives). The commands are
``python -m handlers.archive``, ``python -m handlers.ray_serve`` and ``python -m
handlers.torchserve_config``.
"""

import importlib
import warnings

from handlers import _old_paths
from handlers.core.client_data import parsing_client_data
from handlers.core.request import Request
from handlers.core.responses import RawAnswer
from handlers.engine.errors import BadRequest, PayloadTooLarge, RequestError, UnsupportedMediaType
from handlers.engine.settings import ConfigError, EngineSettings, ModelFiles
from handlers.engine.sizing import MicroBatchSizing, register_sizing

# Names whose modules import torch, numpy or Pillow: loaded on first use, so that importing the
# package costs nothing until a handler is used.
_LAZY = {
    "MicroBatchHandler": "handlers.core.handler",
    "Response": "handlers.core.handler",
    "ImageClassifierHandler": "handlers.ready_made.image_classifier",
    "TensorHandler": "handlers.ready_made.tensor",
    "TextHandler": "handlers.ready_made.text",
    "SentenceEmbeddingHandler": "handlers.ready_made.text",
    "TextClassifierHandler": "handlers.ready_made.text",
    "ImageGeometry": "handlers.ready_made.image_input",
    "ImageLimits": "handlers.ready_made.image_input",
    "decode_image": "handlers.ready_made.image_input",
    "TensorSpec": "handlers.ready_made.tensor_input",
    "parse_array": "handlers.ready_made.tensor_input",
    "pad_to_longest": "handlers.ready_made.text_input",
    "request_text": "handlers.ready_made.text_input",
    "Microbatched": "handlers.servers.torchserve_upgrade",
    "upgrade": "handlers.servers.torchserve_upgrade",
}

# Engine internals that were public before 0.13: still importable from here, with a warning,
# for one release.
_MOVED = {
    "BatchEngine": "handlers.engine.batch_engine",
    "BatchReport": "handlers.engine.batch_engine",
    "plan_micro_batches": "handlers.engine.batch_engine",
    "Failure": "handlers.engine.outcome",
    "Success": "handlers.engine.outcome",
    "read_settings": "handlers.packaging.server_sections",
    "DeadlineExceeded": "handlers.engine.errors",
    "InferenceFailed": "handlers.engine.errors",
    "InternalError": "handlers.engine.errors",
    "OutOfMemory": "handlers.engine.errors",
    "PostprocessFailed": "handlers.engine.errors",
    "ServiceUnavailable": "handlers.engine.errors",
    "SplitFailed": "handlers.engine.errors",
}

__all__ = sorted([
    "BadRequest",
    "ConfigError",
    "EngineSettings",
    "MicroBatchSizing",
    "ModelFiles",
    "PayloadTooLarge",
    "RawAnswer",
    "Request",
    "RequestError",
    "UnsupportedMediaType",
    "parsing_client_data",
    "register_sizing",
    *_LAZY,
])


_old_paths.install()  # handlers._engine and the other 0.12 paths, for one release


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _MOVED:
        module = _MOVED[name]
        warnings.warn(f"handlers.{name} is an engine internal and leaves the public API in the next release; "
                      f"import it from {module} (internal) if you must", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'handlers' has no attribute {name!r}")
