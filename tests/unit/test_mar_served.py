"""A ``.mar`` served outside TorchServe (as a Ray Serve replica starts it, without Ray): read by
handlers.packaging.mar, its handler found by TorchServe's rule (handlers.servers.mar_handler) and
started with the stand-in TorchServe context. A legacy archive made by the real torch-model-archiver
from a stock BaseHandler subclass; ours made by python -m handlers.archive's code."""

import json
import zipfile
from pathlib import Path

import pytest

from handlers.core.handler import MicroBatchHandler
from handlers.core.request import Request
from handlers.engine.settings import ConfigError
from handlers.packaging.mar import MarError, load_mar, model_files_of
from handlers.servers.mar_handler import attach_context, handler_class_for
from handlers.servers.torchserve_upgrade import Microbatched
from tests.legacy_mar import GOOD, HANDLER, MODEL_CONFIG, build_legacy_mar, expected

ROOT = Path(__file__).resolve().parents[2]
JSON_HEADERS = {"Content-Type": "application/json"}


def unpacked(mar, folder):
    spec = load_mar(mar)
    folder.mkdir()
    zipfile.ZipFile(mar).extractall(folder)
    return spec, str(folder)


def started(spec, model_dir):
    """Started as the Ray replica starts it: the class found, the context attached, start()."""
    handler = handler_class_for(model_dir, spec.manifest)()
    attach_context(handler, spec.model_name, model_dir, spec.manifest, spec.model_config, "cpu")
    handler.start(model_dir=model_dir, section=spec.model_config.get("handler"), device="cpu",
                  model_files=model_files_of(spec.manifest), server_timeout_s=30)
    return handler


def answers(handler, bodies):
    responses, _ = handler.respond([Request(json.dumps(b).encode(), JSON_HEADERS) for b in bodies])
    return [(r.status, json.loads(r.payload)) for r in responses]


def test_a_legacy_mar_is_read_with_its_manifest_and_model_config(tmp_path):
    spec = load_mar(build_legacy_mar(tmp_path))
    assert (spec.model_name, spec.handler) == ("legacy", "legacy_handler.py")
    assert spec.model_config == MODEL_CONFIG and spec.ray_serve == {}
    assert model_files_of(spec.manifest).serialized_file == "model.pt" and "model.pt" in spec.files


def test_a_legacy_base_handler_is_upgraded_and_answers_each_request_alone(tmp_path):
    spec, model_dir = unpacked(build_legacy_mar(tmp_path), tmp_path / "model")
    handler = started(spec, model_dir)
    try:
        assert isinstance(handler, Microbatched) and type(handler).__name__ == "LegacyHandler"
        assert handler.context.system_properties["model_dir"] == model_dir
        assert handler.context.system_properties["batch_size"] == MODEL_CONFIG["batchSize"]
        assert answers(handler, GOOD) == [(200, expected(b)) for b in GOOD]
        got = answers(handler, [GOOD[0], {"no_x": 1}, GOOD[2]])
        assert got[0] == (200, expected(GOOD[0])) and got[2] == (200, expected(GOOD[2]))
        assert got[1][0] == 422 and "no field 'x'" in got[1][1]["message"]
    finally:
        handler.close()


def test_our_mar_serves_the_handler_file_its_entry_names(tmp_path):
    from handlers.packaging.archive import archive_config

    mar = archive_config(ROOT / "archiver_configs" / "quickstart.yaml", tmp_path)
    spec, model_dir = unpacked(mar, tmp_path / "model")
    assert spec.handler == "handler_entry.py"
    handler = started(spec, model_dir)
    try:
        assert isinstance(handler, MicroBatchHandler) and not isinstance(handler, Microbatched)
        assert type(handler).__name__ == "QuickstartHandler"
        assert answers(handler, [{"id": "a", "x": [1, 2, 3, 4]}]) == [(200, {"id": "a", "y": [3.0, 5.0, 7.0, 9.0]})]
    finally:
        handler.close()


FUNCTION_HANDLER = HANDLER + '''

_service = LegacyHandler()


def handle(data, context):
    if not _service.initialized:
        _service.initialize(context)
    return _service.handle(data, context)
'''


def test_a_handle_function_is_refused_in_one_line(tmp_path):
    spec, model_dir = unpacked(build_legacy_mar(tmp_path, handler_source=FUNCTION_HANDLER), tmp_path / "model")
    with pytest.raises(ConfigError, match=r"handle\(data, context\) function, which answers whole batches"):
        handler_class_for(model_dir, spec.manifest)
    manifest = {"model": {**spec.manifest["model"], "handler": "legacy_handler:handle"}}
    with pytest.raises(ConfigError, match="is a function"):
        handler_class_for(model_dir, manifest)


def test_a_stock_handler_name_is_found_in_torchserve(tmp_path):
    pytest.importorskip("ts")
    # base_handler: the stock module that needs nothing beyond torch (image_classifier needs torchvision).
    found = handler_class_for(str(tmp_path), {"model": {"handler": "base_handler"}})
    assert issubclass(found, Microbatched) and found.__name__ == "BaseHandler"
    with pytest.raises(ConfigError, match="neither a file in the archive nor one of TorchServe's stock handlers"):
        handler_class_for(str(tmp_path), {"model": {"handler": "no_such_handler"}})


def test_an_archive_that_cannot_be_served_names_every_problem(tmp_path):
    not_zip = tmp_path / "broken.mar"
    not_zip.write_text("not a zip")
    with pytest.raises(MarError, match="not a readable .mar"):
        load_mar(not_zip)
    bad = tmp_path / "bad.mar"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "bad", "configFile": "c.yaml",
                                                                        "serializedFile": "gone.pt"}}))
        archive.writestr("c.yaml", "ray_serve: {num_replicas: 0}\n")
    with pytest.raises(MarError) as caught:
        load_mar(bad)
    lines = str(caught.value).splitlines()
    assert len(lines) == 3, lines
    assert any("ray_serve.num_replicas must be an integer >= 1" in line for line in lines)
    assert any("no model.handler" in line for line in lines)
    assert any("'gone.pt', which the archive does not hold" in line for line in lines)


def test_the_command_refuses_a_broken_mar_before_starting_ray(tmp_path, capsys):
    pytest.importorskip("ray")
    from handlers.ray_serve import main

    broken = tmp_path / "broken.mar"
    broken.write_bytes(b"PK not really")
    assert main([str(broken), "--key-file", str(tmp_path / "key.json")]) == 2
    assert f"error: {broken}: not a readable .mar" in capsys.readouterr().err
    assert not (tmp_path / "key.json").exists()
