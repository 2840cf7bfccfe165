"""Regressions (issue 29, part 1): a handler file loads the same way on every path, the archive
check, a Ray Serve replica and the TorchServe entry, because one function loads it
(``handlers.core.handler_file``)."""

import sys

import pytest

from handlers.archive import main
from handlers.packaging.archive import archive_config, load_spec

from .test_archive_configs import ROOT, forget_modules, load_as_the_worker, write_config  # noqa: F401 - a fixture

# The quickstart handler with a dataclass under PEP 563 annotations (strings until asked for):
# dataclasses look the class's module up in sys.modules while the file is being executed.
ANNOTATED_HANDLER = '''from __future__ import annotations

from dataclasses import dataclass

import torch

from handlers import MicroBatchHandler


class AnnotatedHandler(MicroBatchHandler):
    @dataclass
    class Item:
        id: object
        x: torch.Tensor

    def preprocess_one(self, request):
        payload = request.json()
        return self.Item(payload.get("id"), torch.as_tensor(payload["x"], dtype=torch.float32))

    def collate(self, items):
        return super().collate([item.x for item in items])

    def postprocess_one(self, output, item):
        return {"id": item.id, "y": output.tolist()}
'''

# A handler that imports a module archived beside it (extra_files), as TorchServe allows.
HELPER_HANDLER = '''from helper_offset import OFFSET

from handlers import MicroBatchHandler


class HelperHandler(MicroBatchHandler):
    def preprocess_one(self, request):
        import torch

        return torch.as_tensor(request.json()["x"], dtype=torch.float32) + OFFSET
'''


@pytest.fixture
def path_kept(monkeypatch):
    """sys.path as it was, after a loader put a model folder on it (as a worker keeps it)."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def config_with(tmp_path, source: str):
    """A quickstart config whose handler is ``source``."""
    (tmp_path / "handler.py").write_text(source)
    return write_config(tmp_path, model_name="annotated", handler=str(tmp_path / "handler.py"))


def start_on_a_ray_replica(source: str, monkeypatch, extra: dict = None):
    """Construct the Ray Serve replica class in this process, as Ray does on a node: the
    quickstart's files, with ``source`` as the handler and ``extra`` beside it (the replica's
    __init__ loads the handler and starts it)."""
    from handlers.packaging.archive import build_artefacts, sample_files
    from handlers.servers import ray_serve

    monkeypatch.setattr(ray_serve, "_device", lambda: "cpu")  # no Ray runtime here
    spec = load_spec(ROOT / "archiver_configs" / "quickstart.yaml", ROOT)
    build_artefacts(spec)
    files = {p.name: p.read_bytes() for p in (spec.model_file, spec.serialized_file)}
    files.update(sample_files(spec))
    files.update({"handler.py": source.encode(), **{name: text.encode() for name, text in (extra or {}).items()}})
    model_files = {"model_file": spec.model_file.name, "serialized_file": spec.serialized_file.name}
    return ray_serve.replica_class(1)(files, "handler.py", dict(spec.model_config), model_files, 1 << 20)


def test_a_dataclass_under_future_annotations_passes_the_archive_check(tmp_path, capsys, path_kept):
    """It raised AttributeError ('NoneType' object has no attribute '__dict__'): the check's
    loader did not register the module in sys.modules before executing it."""
    config = config_with(tmp_path, ANNOTATED_HANDLER)
    assert main(["--check", "--root", str(ROOT), str(config)]) == 0, capsys.readouterr().err


def test_a_dataclass_under_future_annotations_starts_on_a_ray_replica(tmp_path, monkeypatch, path_kept):
    replica = start_on_a_ray_replica(ANNOTATED_HANDLER, monkeypatch)
    try:
        assert type(replica.handler).__name__ == "AnnotatedHandler" and replica.handler.initialized
    finally:
        replica.__del__()


def test_a_dataclass_under_future_annotations_starts_through_the_torchserve_entry(tmp_path, monkeypatch,
                                                                                  forget_modules):
    handler = tmp_path / "handler.py"
    handler.write_text(ANNOTATED_HANDLER)
    mar = archive_config(ROOT / "archiver_configs" / "quickstart.yaml", tmp_path / "store", root=ROOT,
                         model_name="annotated", handler=handler)
    service = load_as_the_worker(mar, tmp_path / "unpacked", monkeypatch)
    served = service._entry_point.__self__
    try:
        assert type(served).__name__ == "AnnotatedHandler" and served.initialized
    finally:
        served.close()


def test_a_module_beside_the_handler_imports_on_a_ray_replica(tmp_path, monkeypatch, path_kept):
    """The replica's model folder was not importable: the check and TorchServe passed a handler
    that imports a module archived beside it, and the replica refused it."""
    replica = start_on_a_ray_replica(HELPER_HANDLER, monkeypatch, extra={"helper_offset.py": "OFFSET = 0.0\n"})
    try:
        assert type(replica.handler).__name__ == "HelperHandler" and replica.handler.initialized
    finally:
        replica.__del__()
        sys.modules.pop("helper_offset", None)


# -- The loader itself ----------------------------------------------------------------------------


def test_one_file_has_one_module_name_and_two_handler_files_two(tmp_path):
    from handlers.core.handler_file import module_name_of

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = str(tmp_path / "a" / "handler.py"), str(tmp_path / "b" / "handler.py")
    assert module_name_of(first) == module_name_of(first) != module_name_of(second)
    assert module_name_of(first).startswith("handler_")


def test_a_missing_file_or_class_is_a_config_error_naming_it(tmp_path, path_kept):
    from handlers.core.handler_file import load_handler_class
    from handlers.engine.settings import ConfigError

    with pytest.raises(ConfigError, match="nowhere.py does not exist"):
        load_handler_class(str(tmp_path / "nowhere.py"))
    (tmp_path / "two.py").write_text("class A:\n    pass\n\n\nclass B:\n    pass\n")
    with pytest.raises(ConfigError, match="two.py must define exactly one class .* found A, B"):
        load_handler_class(str(tmp_path / "two.py"))
    (tmp_path / "none.py").write_text("from json import JSONDecoder\n")
    with pytest.raises(ConfigError, match="found none"):
        load_handler_class(str(tmp_path / "none.py"))


def test_a_file_that_fails_leaves_no_module_behind(tmp_path, path_kept):
    from handlers.core.handler_file import load_python_file, module_name_of

    (tmp_path / "broken.py").write_text("raise RuntimeError('at import')\n")
    with pytest.raises(RuntimeError, match="at import"):
        load_python_file(str(tmp_path / "broken.py"))
    assert module_name_of(str(tmp_path / "broken.py")) not in sys.modules
    assert sys.path[0] == str(tmp_path)  # the model folder stays importable, as in a worker
