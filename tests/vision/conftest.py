"""TorchServe's stock vision handlers (``ts.torch_handler.vision_handler`` and the handlers built
on it, ``image_classifier`` among them) import torchvision and captum. torchvision needs the torch
of its own release, and the CPU torch 2.13.0 of the project's venv has none on this machine's
mirrors, so these tests run in a venv of their own: ``.venv-vision`` (torch 2.14.1, torchvision
0.29.1, captum; ``constraints-vision.txt``), which ``make test`` builds and runs them in.

In a venv without torchvision they are skipped, each with that reason (``pytest -ra`` prints it);
``make test`` sets ``MBH_VISION_TESTS=required``, under which a missing torchvision (or Ray, which
the stock .mar on Ray Serve needs) fails the run instead of skipping it."""

import importlib.util
import os

import pytest

MISSING = [name for name in ("torchvision", "captum") if importlib.util.find_spec(name) is None]
REASON = (f"needs {' and '.join(MISSING)} (TorchServe's stock vision handlers import them): "
          "`make test` runs these in .venv-vision, see tests/vision/conftest.py")

REQUIRED = os.environ.get("MBH_VISION_TESTS") == "required"
# The stock .mar on Ray Serve (test_stock_on_ray.py) needs Ray in this venv too; make vision-venv installs it.
RAY_MISSING = importlib.util.find_spec("ray") is None
RAY_REASON = "needs ray in this venv (make vision-venv installs it, pinned in constraints-vision.txt)"

LACKING = MISSING + (["ray"] if RAY_MISSING else [])
if LACKING and REQUIRED:
    raise RuntimeError(f"MBH_VISION_TESTS=required, but this Python lacks {', '.join(LACKING)}: "
                       "run these tests with .venv-vision/bin/python (make test builds it)")


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """One real TorchServe for the session, serving the stock ``image_classifier`` .mar as
    ``stock`` and its one-line upgrade as ``upgraded`` (tests/vision/stock_torchserve.py)."""
    from tests.vision.stock_torchserve import serve_both

    server = serve_both(tmp_path_factory.mktemp("stock_served"))
    try:
        yield server
    finally:
        server.stop()
