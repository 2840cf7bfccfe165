"""The one loader of a user's Python file (a handler file, a model file), used on every path: the
archive check, a Ray Serve replica, the TorchServe entry, the test kit.

It imports the file as TorchServe's worker would: its folder importable (TorchServe puts the model
folder on the worker's ``PYTHONPATH``), and the module in ``sys.modules`` before its code runs, as
``import`` does (``dataclasses`` and ``typing`` look a class's module up there while the class is
being made). Only the standard library and ``handlers.engine``: the TorchServe entry imports this
before it knows whether torch itself can be imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from types import ModuleType

from handlers.engine.settings import ConfigError


def module_name_of(path: str) -> str:
    """The name a file is imported under: its stem and a digest of its absolute path, so that
    the same file gets the same name and two ``handler.py`` of two models do not collide."""
    absolute = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(absolute))[0]
    return f"{stem}_{hashlib.sha1(absolute.encode()).hexdigest()[:12]}"


def load_python_file(path: str, name: str | None = None) -> ModuleType:
    """Import the Python file at ``path`` (again, if it was) under ``name`` (default:
    :func:`module_name_of`) and return the module. Its folder goes first on ``sys.path`` (and
    stays: its code may import a module beside it later). Raises ConfigError when there is no
    such file; the file's own errors (SyntaxError, ImportError, ...) as they are."""
    # abspath, not realpath: a staged archive links its files, and the link's folder is the model's.
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist: the handler or model file must be in the model folder")
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = name or module_name_of(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path} cannot be imported as Python: name it *.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec, as import does
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if sys.modules.get(name) is module:
            del sys.modules[name]
        raise
    return module


def classes_defined_in(module: ModuleType) -> list:
    """The classes a module defines itself, not those it imports, by name (TorchServe's
    ``list_classes_from_module``)."""
    return sorted((value for value in vars(module).values()
                   if isinstance(value, type) and value.__module__ == module.__name__), key=lambda c: c.__name__)


def handler_class_of(module: ModuleType, file_name: str) -> type:
    """The handler class a handler file's module defines: its one class, or, beside helper
    classes (a ``@dataclass`` for the per-request item, the model), its one subclass of
    ``MicroBatchHandler``. TorchServe's own rule (exactly one class in the file) binds the
    archive's entry module, which subclasses this one, not the user's file. Raises ConfigError
    for no class, or several and not exactly one handler among them."""
    classes = classes_defined_in(module)
    if len(classes) == 1:
        return classes[0]
    names = ", ".join(c.__name__ for c in classes) or "none"
    # Imported already when the file subclasses it (this module stays torch-free).
    base = getattr(sys.modules.get("handlers.core.handler"), "MicroBatchHandler", None)
    handlers = [c for c in classes if base is not None and issubclass(c, base)]
    if len(handlers) == 1:
        return handlers[0]
    if len(handlers) > 1:
        raise ConfigError(f"{file_name} defines {len(handlers)} handler classes ({', '.join(c.__name__ for c in handlers)}) "
                          f"and must define exactly one: move a base class of your own into another module "
                          f"(in extra_files) and import it")
    raise ConfigError(f"{file_name} must define exactly one class (TorchServe's rule), or one MicroBatchHandler "
                      f"subclass beside helper classes; found {names}")


def load_handler_class(path: str) -> type:
    """The handler class the handler file at ``path`` defines (:func:`handler_class_of`). Raises
    ConfigError when the file is missing or defines no class, or several and not one handler."""
    return handler_class_of(load_python_file(path), os.path.basename(path))
