"""The public surface is on purpose: this list changes only with a decision."""

import subprocess
import sys

import pytest

import handlers
import handlers.testing


def test_public_names_are_pinned():
    """What a handler author needs: handlers, Request/Response, the client errors and the call
    that turns a parser's errors into them, settings, the sizing extension point, input parsers."""
    assert sorted(handlers.__all__) == [
        "BadRequest", "ConfigError", "EngineSettings", "ImageClassifierHandler", "ImageGeometry", "ImageLimits",
        "MicroBatchHandler", "MicroBatchSizing", "Microbatched", "ModelFiles", "PayloadTooLarge", "RawAnswer", "Request",
        "RequestError",
        "Response", "SentenceEmbeddingHandler", "TensorHandler", "TensorSpec", "TextClassifierHandler",
        "TextHandler", "UnsupportedMediaType", "decode_image", "pad_to_longest", "parse_array",
        "parsing_client_data", "register_sizing", "request_text", "upgrade",
    ]
    for name in handlers.__all__:
        assert getattr(handlers, name) is not None


@pytest.mark.parametrize("name", ["BatchEngine", "BatchReport", "plan_micro_batches", "Failure", "Success",
                                  "read_settings", "SplitFailed", "OutOfMemory", "ServiceUnavailable"])
def test_engine_internals_left_the_public_api_but_still_import_with_a_warning(name):
    assert name not in handlers.__all__
    with pytest.warns(DeprecationWarning, match=f"handlers.{name} is an engine internal"):
        assert getattr(handlers, name) is not None


def test_testing_kit_names_are_pinned():
    assert sorted(handlers.testing.__all__) == [
        "FakeContext", "FakeMetrics", "LocalServer", "RecordedMetric", "as_client_reads", "assert_batch_contract",
        "assert_isolates_bad_request", "assert_matches_alone", "run_batch", "start_archived_handler",
        "start_handler",
    ]


def test_the_engine_imports_without_torch_or_torchserve():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['ts'] = None\n"
        "from handlers import EngineSettings\nfrom handlers.engine.batch_engine import BatchEngine\n"
        "with BatchEngine(int, lambda xs: [x * 2 for x in xs], lambda o, i: o, EngineSettings(pool_size=1)) as e:\n"
        "    print([o.value for o in e.run(['1', '2']).outcomes])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[2, 4]"


def imported_roots(path):
    import ast

    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_each_server_is_known_to_its_adapter_modules_and_the_engine_needs_no_torch():
    import pathlib

    package = pathlib.Path(handlers.__file__).parent
    modules = {p.relative_to(package).as_posix(): p for p in package.rglob("*.py")}
    importing_ts = {name for name, path in modules.items() if "ts" in imported_roots(path)}
    assert importing_ts == {"servers/torchserve.py"}  # TorchServe's metric dimension (optional import)
    importing_ray = {name for name, path in modules.items() if "ray" in imported_roots(path)}
    assert importing_ray <= {"servers/ray_serve.py", "servers/ray_cluster.py"}
    for name, path in modules.items():
        if name.startswith(("engine/", "core/", "ready_made/", "packaging/")):
            assert not imported_roots(path) & {"ts", "ray"}, name
        if name.startswith("engine/") or name in ("core/request.py", "core/responses.py", "core/metrics.py",
                                                  "core/client_data.py"):
            assert not imported_roots(path) & {"torch", "ts", "numpy", "PIL"}, name
