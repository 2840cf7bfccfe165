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
        "MicroBatchHandler", "MicroBatchSizing", "ModelFiles", "PayloadTooLarge", "Request", "RequestError",
        "Response", "SentenceEmbeddingHandler", "TensorHandler", "TensorSpec", "TextClassifierHandler",
        "TextHandler", "UnsupportedMediaType", "decode_image", "pad_to_longest", "parse_array",
        "parsing_client_data", "register_sizing", "request_text",
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
        "from handlers import EngineSettings\nfrom handlers._engine import BatchEngine\n"
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


def test_each_server_is_known_to_one_adapter_module_and_the_engine_needs_no_torch():
    import pathlib

    package = pathlib.Path(handlers.__file__).parent
    importing_ts = {p.name for p in package.glob("*.py") if "ts" in imported_roots(p)}
    assert importing_ts == {"_torchserve.py"}  # TorchServe's metric dimension (optional import)
    importing_ray = {p.name for p in package.glob("*.py") if "ray" in imported_roots(p)}
    assert importing_ray <= {"_rayserve.py"}
    for name in ("_core.py", "_engine.py", "_image_handler.py", "_text_handler.py", "_tensor_handler.py"):
        assert not imported_roots(package / name) & {"ts", "ray"}, name
    for name in ("_engine.py", "_clocks.py", "_sizing.py", "_outcome.py", "_errors.py", "_settings.py", "_request.py",
                 "_pool.py", "_scatter.py", "_model_call.py", "_responses.py", "_metrics.py", "_client_data.py"):
        assert not imported_roots(package / name) & {"torch", "ts", "numpy", "PIL"}, name
