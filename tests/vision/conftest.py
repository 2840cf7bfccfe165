"""TorchServe's stock vision handlers (``ts.torch_handler.vision_handler`` and the handlers built
on it, ``image_classifier`` among them) import torchvision and captum. torchvision needs the torch
of its own release, and the CPU torch 2.13.0 of the project's venv has none on this machine's
mirrors, so these tests run in a venv of their own: ``.venv-vision`` (torch 2.14.1, torchvision
0.29.1, captum; ``constraints-vision.txt``), which ``make test`` builds and runs them in.

In a venv without torchvision they are skipped, each with that reason (``pytest -ra`` prints it);
``make test`` sets ``MBH_VISION_TESTS=required``, under which a missing torchvision fails the run
instead of skipping it."""

import importlib.util
import os

MISSING = [name for name in ("torchvision", "captum") if importlib.util.find_spec(name) is None]
REASON = (f"needs {' and '.join(MISSING)} (TorchServe's stock vision handlers import them): "
          "`make test` runs these in .venv-vision, see tests/vision/conftest.py")

if MISSING and os.environ.get("MBH_VISION_TESTS") == "required":
    raise RuntimeError(f"MBH_VISION_TESTS=required, but this Python lacks {', '.join(MISSING)}: "
                       "run these tests with .venv-vision/bin/python (make test builds it)")
