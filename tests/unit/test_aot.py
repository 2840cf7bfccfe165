"""AOTInductor packages (handler.compile.aot): built per bucket by the archive tool into the
``.mar`` (real torch-model-archiver, real AOTInductor), loaded by a worker instead of compiling,
checked against the worker's torch and device, and never run on inputs they were not built for."""

import json
import logging
import os
import shutil
import zipfile

import pytest
import torch

from handlers.core.aot import AOT_FOLDER, INDEX
from handlers.testing import run_batch, start_archived_handler
from tests.aot_archive import BUCKETS

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                reason="AOTInductor needs a C++ compiler")


def started(mar, workdir):
    return start_archived_handler(mar, workdir)


def rows(count, offset=0.0):
    return [[offset + i + j / 4 for j in range(4)] for i in range(count)]


def answers(handler, batch):
    """The y of each row's answer, all sent as one TorchServe batch."""
    bodies = [json.dumps({"id": i, "x": row}).encode() for i, row in enumerate(batch)]
    responses, _ = run_batch(handler, bodies, [{"Content-Type": "application/json"}] * len(bodies))
    return [response["y"] for response in responses]


def affine(batch):
    return [pytest.approx([2 * v + 1 for v in row]) for row in batch]


def test_the_archive_carries_one_package_per_bucket_built_for_this_torch_on_the_cpu(aot_mar):
    with zipfile.ZipFile(aot_mar) as archive:
        names = set(archive.namelist())
        index = json.loads(archive.read(f"{AOT_FOLDER}/{INDEX}"))
    assert index["torch"] == torch.__version__ and index["device"] == "cpu"
    assert sorted(int(size) for size in index["packages"]) == BUCKETS
    for entry in index["packages"].values():
        assert f"{AOT_FOLDER}/{entry['file']}" in names


def test_a_worker_loads_the_packages_without_compiling_and_answers_as_eager(aot_mar, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="handlers"):
        handler = started(aot_mar, tmp_path)
    try:
        assert handler.compiled is not None and handler.compiled.sizes == tuple(BUCKETS)
        assert "loaded AOTInductor packages" in caplog.text
        assert not (tmp_path / "compile_cache").exists()  # nothing compiled at start-up
        calls = []
        packages = handler.compiled.infer
        runners = packages._runners
        for key, (size, runner) in list(runners.items()):
            runners[key] = (size, lambda batch, _run=runner, _size=size: calls.append(_size) or _run(batch))
        for count in (1, 2, 3, 4, 7):  # bucket sizes run the packages, others eager
            batch = rows(count, offset=count)
            assert answers(handler, batch) == affine(batch)
        assert set(calls) == set(BUCKETS)
    finally:
        handler.close()


def test_inputs_the_packages_were_not_built_for_run_eager(aot_mar, tmp_path):
    handler = started(aot_mar, tmp_path)
    try:
        packages = handler.compiled.infer
        between = torch.ones(3, 4)  # a size between the buckets: no package holds it
        assert torch.equal(packages(between), 2 * between + 1)
        with pytest.raises(Exception, match="do not match"):
            packages.strict(between)
        strided = torch.arange(8.0).reshape(4, 2).t()  # a package's shape (2, 4), another memory layout
        with pytest.raises(Exception, match="do not match"):
            packages.strict(strided)
        assert torch.equal(packages(strided), 2 * strided + 1)
    finally:
        handler.close()


@pytest.mark.parametrize("field, value, message", [
    ("torch", "1.0.0", "built with torch 1.0.0 and this worker has torch"),
    ("device", "cuda", "built for cuda and this worker runs on cpu"),
    ("threads", 99, "built for 99 CPU thread(s) per micro-batch and this worker runs"),
])
def test_packages_for_another_torch_or_device_leave_the_worker_eager_said_in_one_line(
        aot_mar, tmp_path, caplog, field, value, message):
    with zipfile.ZipFile(aot_mar) as archive:
        archive.extractall(tmp_path / "unpacked")
    index_path = tmp_path / "unpacked" / AOT_FOLDER / INDEX
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, field: value}))
    edited = tmp_path / "edited.mar"
    with zipfile.ZipFile(edited, "w") as archive:
        for path in (tmp_path / "unpacked").rglob("*"):
            if path.is_file():
                archive.write(path, path.relative_to(tmp_path / "unpacked"))
    with caplog.at_level(logging.WARNING, logger="handlers"):
        handler = started(edited, tmp_path / "worker")
    try:
        assert handler.compiled is None
        lines = [r.getMessage() for r in caplog.records if "handler.compile.aot" in r.getMessage()]
        assert len(lines) == 1 and message in lines[0] and lines[0].endswith("this worker runs eager")
        assert answers(handler, rows(2)) == affine(rows(2))
    finally:
        handler.close()


def test_without_packages_an_aot_worker_compiles_at_start_up_and_says_so(tmp_path, caplog):
    from handlers.testing import LocalServer
    from tests.unit.models import AffineHandler

    config = {"micro_batch_size": 4, "audit_share": 0.0, "compile": {"aot": True, "backend": "eager", "buckets": BUCKETS}}
    with caplog.at_level(logging.INFO, logger="handlers"):
        with LocalServer.start(AffineHandler, model_dir=str(tmp_path), handler_config=config, samples=rows(3)) as server:
            assert server.handler.compiled is not None
            assert [r.body for r in server.send(rows(3))] == affine(rows(3))
    assert "holds no AOTInductor packages" in caplog.text and "compiling at start-up instead" in caplog.text
    assert "compiled (backend eager" in caplog.text
    torch._dynamo.reset()  # dynamo keeps it on infer's code object: not for other tests' backends


def test_torchserves_pt2_export_section_is_read_as_aot():
    from handlers.core.compiled import read_compile, with_pt2

    settings = read_compile(with_pt2({"micro_batch_size": 4}, {"export": {"aot_compile": True}})["compile"])
    assert settings is not None and settings.aot
