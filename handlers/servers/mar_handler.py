"""The class that serves a ``.mar`` outside TorchServe, found by TorchServe's own rule
(``ts/model_loader.py``): the manifest's ``handler`` is a module in the archive (or one of
TorchServe's stock handlers, ``ts.torch_handler.<name>``); a module-level ``handle`` function wins,
else the one class the module defines.

- An archive of ``python -m handlers.archive``: its generated entry module names the user's
  handler file, whose :class:`~handlers.core.handler.MicroBatchHandler` is served as it is.
- A TorchServe handler class (a ``BaseHandler`` subclass, or any class with ``initialize``,
  ``preprocess``, ``inference`` and ``postprocess``): served by the engine through
  :func:`~handlers.servers.torchserve_upgrade.upgrade`, its ``initialize(context)`` given a
  :class:`~handlers.servers.ts_context.StandInContext`.
- A ``handle(data, context)`` function (``module:function`` too), or a class without those hooks:
  refused in one line. Such a handler answers whole batches: the engine cannot give each request
  its own answer or error, which is what serving it here is for (serve it on TorchServe).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Mapping

from handlers.core.handler import MicroBatchHandler
from handlers.core.handler_file import classes_defined_in, load_python_file
from handlers.engine.settings import ConfigError
from handlers.packaging.torchserve_entry import ENTRY_SUFFIX
from handlers.servers.torchserve_upgrade import Microbatched, upgrade
from handlers.servers.ts_context import StandInContext

STOCK_PACKAGE = "ts.torch_handler"
OUR_ENTRY_MARK = "from handlers.packaging.torchserve_entry import entry_points"


def handler_class_for(model_dir: str, manifest: Mapping[str, Any]) -> type:
    """The MicroBatchHandler class that serves the archive unpacked in ``model_dir``. Raises
    ConfigError (a refusal, in one line) or the handler module's own import error."""
    handler = manifest["model"]["handler"]
    if ":" in handler:
        raise ConfigError(f"the archive's handler {handler!r} is a function (module:function), which answers whole "
                          f"batches: serve it on TorchServe, or archive a handler class (a BaseHandler subclass)")
    module = _handler_module(Path(model_dir), handler[:-3] if handler.endswith(".py") else handler)
    function = vars(module).get("handle")
    if callable(function) and not isinstance(function, type):
        raise ConfigError(f"the archive's handler {handler} serves a module-level handle(data, context) function, "
                          f"which answers whole batches (TorchServe prefers it to a class): serve it on TorchServe, "
                          f"or archive a file that defines the handler class alone")
    classes = classes_defined_in(module)
    if len(classes) != 1:
        names = ", ".join(c.__name__ for c in classes) or "none"
        raise ConfigError(f"the archive's handler {handler} must define exactly one class (TorchServe's rule), "
                          f"found {names}")
    [found] = classes
    if issubclass(found, MicroBatchHandler):
        return found
    try:
        return upgrade(found)
    except TypeError as exc:
        raise ConfigError(f"the archive's handler class cannot be micro-batched: {exc}") from None


def _handler_module(model_dir: Path, module_name: str):
    """The handler module, loaded as the worker loads it (the model folder importable)."""
    path = model_dir / f"{module_name}.py"
    if path.is_file():
        if path.name.endswith(ENTRY_SUFFIX) and OUR_ENTRY_MARK in path.read_text(errors="replace"):
            # Ours: the entry loads the user's file beside it; load that file directly, so that
            # its own errors are what the start-up failure line says.
            user_file = model_dir / (path.name[:-len(ENTRY_SUFFIX)] + ".py")
            return load_python_file(str(user_file))
        return load_python_file(str(path))
    if str(model_dir) not in sys.path:  # a stock handler imports the archive's model file by name
        sys.path.insert(0, str(model_dir))
    try:
        return importlib.import_module(f"{STOCK_PACKAGE}.{module_name}")
    except ImportError as exc:
        raise ConfigError(f"the archive's handler {module_name!r} is neither a file in the archive nor one of "
                          f"TorchServe's stock handlers importable here ({exc}): stock handlers need torchserve "
                          f"installed in the replicas' Python") from None


def attach_context(handler: Any, model_name: str, model_dir: str, manifest: Mapping[str, Any],
                   model_config: Mapping[str, Any], device: str) -> None:
    """Give an upgraded TorchServe handler the context its ``initialize(context)`` reads (see
    :class:`StandInContext`); other handlers need none."""
    if not isinstance(handler, Microbatched):
        return
    gpu_id = None
    if str(device).startswith("cuda"):
        import torch

        gpu_id = torch.cuda.current_device()
    handler.context = StandInContext(model_name, model_dir, manifest, model_config, gpu_id,
                                     int(model_config.get("batchSize", 1)))


def manifest_for(model_name: str, handler_file: str, model_file: Any, serialized_file: Any) -> dict:
    """The manifest an archive of these files would have (for a handler served from an archiver
    config, whose ``initialize(context)`` may read it)."""
    model = {"modelName": model_name, "handler": handler_file}
    if model_file:
        model["modelFile"] = model_file
    if serialized_file:
        model["serializedFile"] = serialized_file
    return {"runtime": "python", "model": model}
