"""Model loading the way TorchServe archives carry models: an eager model (``--model-file`` with
one ``nn.Module`` class + ``--serialized-file`` state_dict) or a TorchScript file."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import warnings
from typing import Any

import torch

from handlers.core.handler_file import load_handler_class, load_python_file  # noqa: F401 - load_handler_class's old home
from handlers.engine.settings import ConfigError, ModelFiles


def load_model_files(model_dir: str, files: ModelFiles, device: torch.device) -> Any:
    """Load the model that ``files`` name, on ``device``.

    With a model file: build its one ``nn.Module`` class (no arguments) and load the serialized
    file into it as a state_dict with ``weights_only=True`` (no pickle code runs). Without one: a
    ``torch.export`` program (``.pt2``), else TorchScript. Errors name the file and the fix.
    """
    serialized = os.path.join(model_dir, files.serialized_file) if files.serialized_file else None
    if files.model_file:
        model = build_module(os.path.join(model_dir, files.model_file))
        if serialized:
            model.load_state_dict(_load_state_dict(serialized, device))
        return model
    if serialized and serialized.endswith(".pt2"):
        return _load_exported(serialized)
    if serialized:
        with warnings.catch_warnings():  # torch's deprecation notice: TorchScript keeps working here
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
            return torch.jit.load(serialized, map_location=device)
    raise RuntimeError(
        "the archive has no model: archive a --model-file (+ --serialized-file weights), a "
        "torch.export program (.pt2) or a TorchScript --serialized-file, or override load_model()"
    )


def _load_state_dict(path: str, device: torch.device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        if not _written_by_torch_save(path):  # garbage is refused by the same unpickler
            raise RuntimeError(f"cannot read the weights {path}: it is not a file torch.save wrote (neither "
                               f"a zip archive nor a pickle); save them with torch.save(model.state_dict(), ...)") from None
        raise pickle.UnpicklingError(
            f"{path} holds more than weights (a whole model saved with torch.save(model)?), and it is "
            f"not unpickled: that would run code from the file. Save the weights instead, "
            f"torch.save(model.state_dict(), ...), and archive the model class with --model-file; or "
            f"export the model: torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise RuntimeError(
            f"cannot read the weights {path}: {_first_line(exc)}. Is it truncated, or not made by torch.save? "
            f"Save them again with torch.save(model.state_dict(), ...)"
        ) from None


def _load_exported(path: str) -> Any:
    """A ``torch.export`` program as a callable module (on the device it was exported on)."""
    try:
        return torch.export.load(path).module()
    except Exception as exc:  # noqa: BLE001 - named with the file and the fix
        raise RuntimeError(
            f"cannot load the torch.export program {path}: {exc}. Make it with "
            f"torch.export.save(torch.export.export(model, example_inputs), '{os.path.basename(path)}')"
        ) from None


def build_module(path: str) -> torch.nn.Module:
    """Instantiate the one public ``nn.Module`` subclass defined in the Python file at ``path``
    (helpers named with a leading underscore may sit beside it). A file that defines none may
    import its model instead (``from my_models import Net``): the one public ``nn.Module``
    subclass it imports from outside torch."""
    module = load_python_file(path)
    public = {cls: name for name, cls in inspect.getmembers(module, inspect.isclass)
              if issubclass(cls, torch.nn.Module) and not name.startswith("_") and not cls.__name__.startswith("_")}
    classes = [cls for cls in public if cls.__module__ == module.__name__]
    imported = [cls for cls in public if cls.__module__.partition(".")[0] != "torch" and cls not in classes]
    if not classes and len(imported) == 1:
        return imported[0]()
    if len(classes) != 1:
        found = ", ".join(sorted(c.__name__ for c in classes)) or "none"
        hint = (f" (it imports {', '.join(sorted(public[c] for c in imported))}: import only the model, or define "
                f"it: class Model({public[imported[0]]}): pass)") if not classes and imported else ""
        raise RuntimeError(f"{path} must define (or import) exactly one public torch.nn.Module class, found "
                           f"{found}{hint}")
    return classes[0]()


PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def prepare_model(model: Any, device: torch.device, precision: str, channels_last: bool) -> Any:
    """Put an ``nn.Module`` on ``device`` in eval mode; on a GPU, optionally in half/bfloat16
    and channels-last memory format (CPUs gain little from either and lose accuracy)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"handler.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(model, torch.nn.Module):
        return model
    model = model.to(device)
    if not isinstance(model, torch.fx.GraphModule):  # an exported program is already in eval form
        model = model.eval()
    if device.type == "cuda":
        if precision != "float32":
            model = model.to(PRECISIONS[precision])
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    return model


def model_dtype(model: Any) -> torch.dtype:
    """The floating dtype of a model's parameters (float32 when it has none)."""
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
    return torch.float32


def read_labels(model_dir: str, filename: str) -> dict:
    """``index_to_name.json`` as {int index: name}; TorchServe's two styles are accepted:
    ``{"0": "cat"}`` and ImageNet's ``{"0": ["n02123045", "tabby"]}``. Empty when absent."""
    path = os.path.join(model_dir, filename)
    if not filename or not os.path.exists(path):
        return {}
    with open(path) as f:
        raw = json.load(f)
    return {int(key): value[-1] if isinstance(value, list) else str(value) for key, value in raw.items()}


def _first_line(exc: BaseException) -> str:
    """An exception's first line, or its type when it has no message (an empty file's EOFError)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else f"{type(exc).__name__} (the file is empty or cut short)"


def _written_by_torch_save(path: str) -> bool:
    """A zip archive (torch.save's format) or a pickle (its legacy format, PROTO opcode first)."""
    import zipfile

    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as file:
        return file.read(1) == b"\x80"
