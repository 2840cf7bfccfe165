"""The TorchServe entry of an archive built by ``python -m handlers.archive``: a small generated
module, the archive's ``--handler``, that loads the user's handler file itself. When that file
cannot be loaded (a module missing from the archive or from TorchServe's Python, a syntax error),
the worker logs the one documented line, ``microbatch-handlers: model <name> cannot start: <why>``,
before TorchServe's traceback, as for any other start-up failure.

TorchServe 0.12 (``ts/model_loader.py``) imports the handler module by name (the archive root is
on the worker's path), then serves its module-level ``handle`` function if it has one, else the
one class the module itself defines (``list_classes_from_module``: exactly one class whose
``__module__`` is the module's). The entry module gives it the same: the user's ``handle``, or a
subclass of the user's handler class with its name (so the user's file may hold helper classes
beside it, see ``handler_class_of``); for a file that cannot be loaded, one
class whose ``initialize`` logs the line (with the model name TorchServe registered) and raises
the loading error. The user's file is loaded by ``handlers.core.handler_file``, as on every other
path. Only the standard library and torch-free modules of this package are imported here: the
missing module may be torch itself.
"""

from __future__ import annotations

import logging
import os

from handlers.core.handler_file import classes_defined_in, handler_class_of, load_python_file
from handlers.engine.settings import ConfigError

log = logging.getLogger(__name__)

ENTRY_SUFFIX = "_entry.py"

_SOURCE = '''"""TorchServe's handler for this archive, written by `python -m handlers.archive`: it loads
{handler_file} and serves its handler. When {handler_file} cannot be loaded (a module missing from
the archive or from TorchServe's Python), the worker logs one line,
"microbatch-handlers: model <name> cannot start: <why>", before TorchServe's traceback."""

from handlers.packaging.torchserve_entry import entry_points

globals().update(entry_points(__name__, __file__, {handler_file!r}))
'''


def entry_file_name(handler_file: str) -> str:
    """The entry module's file name for a handler file: ``handler.py`` → ``handler_entry.py``."""
    return os.path.splitext(os.path.basename(handler_file))[0] + ENTRY_SUFFIX


def entry_source(handler_file: str) -> str:
    """The entry module's source for ``handler_file`` (a name at the archive's root)."""
    return _SOURCE.format(handler_file=os.path.basename(handler_file))


def entry_points(entry_module: str, entry_file: str, handler_file: str) -> dict:
    """The names the entry module defines for TorchServe: ``{"handle": function}`` for a handler
    file with a module-level ``handle``, else ``{ClassName: subclass of the user's class}``; for a
    file that cannot be loaded (or has no single class), ``{"HandlerCannotStart": class}``."""
    path = os.path.join(os.path.dirname(os.path.abspath(entry_file)), handler_file)
    try:
        module = load_python_file(path)
        if hasattr(module, "handle"):  # TorchServe prefers a handle function, as here
            return {"handle": module.handle}
        if not classes_defined_in(module):
            raise ConfigError(f"{handler_file} must define a handler class or a handle function; it defines neither")
        user_class = handler_class_of(module, handler_file)  # the handler, helper classes beside it allowed
    except Exception as exc:  # noqa: BLE001 - reported by the worker in one line, then raised
        return {"HandlerCannotStart": _cannot_start(entry_module, exc)}
    # Defined in the entry module (TorchServe's rule), named as the user's class (in logs).
    served = type(user_class.__name__, (user_class,), {"__module__": entry_module, "__doc__": user_class.__doc__})
    return {user_class.__name__: served}


def _cannot_start(entry_module: str, error: Exception) -> type:
    """The class TorchServe serves when the handler file cannot be loaded."""

    class HandlerCannotStart:
        """Stands for a handler file that cannot be loaded: ``initialize`` logs the one line; on
        a real worker the worker stays up and ``handle`` answers every request with a 503 that
        carries the line (``handlers.servers.torchserve.initialize`` does the same for a model
        that fails later in its start-up); elsewhere it raises the error."""

        line = None

        def initialize(self, context):
            from handlers.engine.errors import startup_failure_line  # standard library only
            from handlers.servers.torchserve import on_a_worker  # torch-free

            name = getattr(context, "model_name", None) or "?"
            line = startup_failure_line(str(name), error)
            if not on_a_worker(context):
                log.error("%s", line)
                raise error
            log.error("%s", line, exc_info=error)
            self.line = line

        def handle(self, data, context):
            if self.line is None:
                raise error  # not reached: initialize raised
            from handlers.servers.torchserve import answer_cannot_start

            return answer_cannot_start(self.line, data, context)

    HandlerCannotStart.__module__ = entry_module
    return HandlerCannotStart
