"""The module paths of 0.12 and before (``handlers._engine`` and the rest, one flat package),
importable for one release with a DeprecationWarning: each old name is the module it became
(the same object, so a patch through either name is seen by both)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

OLD_PATHS = {
    "handlers._admission": "handlers.engine.admission",
    "handlers._client_data": "handlers.core.client_data",
    "handlers._clocks": "handlers.engine.clocks",
    "handlers._core": "handlers.core.handler",
    "handlers._engine": "handlers.engine.batch_engine",
    "handlers._entry": "handlers.packaging.torchserve_entry",
    "handlers._errors": "handlers.engine.errors",
    "handlers._image_handler": "handlers.ready_made.image_classifier",
    "handlers._images": "handlers.ready_made.image_input",
    "handlers._loading": "handlers.core.loading",
    "handlers._metrics": "handlers.core.metrics",
    "handlers._model_call": "handlers.engine.model_call",
    "handlers._outcome": "handlers.engine.outcome",
    "handlers._pool": "handlers.engine.pool",
    "handlers._rayserve": "handlers.servers.ray_serve",
    "handlers._request": "handlers.core.request",
    "handlers._responses": "handlers.core.responses",
    "handlers._scatter": "handlers.engine.scatter",
    "handlers._self_test": "handlers.core.self_test",
    "handlers._settings": "handlers.engine.settings",
    "handlers._sizing": "handlers.engine.sizing",
    "handlers._tensor_handler": "handlers.ready_made.tensor",
    "handlers._tensors": "handlers.ready_made.tensor_input",
    "handlers._text": "handlers.ready_made.text_input",
    "handlers._text_handler": "handlers.ready_made.text",
    "handlers._torchserve": "handlers.servers.torchserve",
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and hands over the module it became."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in OLD_PATHS else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {OLD_PATHS[spec.name]}; the old path is removed in the next release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(OLD_PATHS[spec.name])
        # The import machinery then sets this alias's spec on the module: keep its own with the
        # alias (one per import, so concurrent imports of two old paths cannot mix them up).
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Make the old paths importable (idempotent)."""
    if not any(isinstance(finder, _OldPaths) for finder in sys.meta_path):
        sys.meta_path.append(_OldPaths())
