"""The archive command checks configs before it runs torch-model-archiver."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from handlers.archive import main
from handlers.packaging.archive import ArchiveConfigError, load_spec

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path, **overrides):
    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("overrides, message", [
    ({"model_name": None}, "model_name: missing (required)"),
    ({"model_name": "bad name!"}, "model_name: must be letters, digits"),
    ({"handler": "examples/nowhere.py"}, "examples/nowhere.py does not exist"),
    ({"handler": "examples/quickstart/handlr.py"}, "handlr.py does not exist (did you mean 'handler.py'?)"),
    ({"modelname": "x"}, "modelname: not a known key"),
    ({"build": "python build.py"}, "build: must be a command as a list of strings"),
    ({"model_config": {"batchSize": 0}}, "model_config.batchSize: must be an integer >= 1, got 0"),
    ({"model_config": {"maxBatchDelay": -5}}, "model_config.maxBatchDelay: must be an integer >= 0, got -5"),
    ({"model_config": {"minWorkers": 3, "maxWorkers": 1}}, "model_config.minWorkers: must not exceed maxWorkers (1)"),
    ({"model_config": {"handler": {"micro_batch_size": 0}}}, "handler.micro_batch_size must be an integer >= 1"),
    ({"model_config": {"handler": {"pool": 2}}}, "handler.pool is not a known setting"),
    # Regressions: accepted silently, and without effect.
    ({"model_config": {"batchsize": 8}}, "model_config.batchsize: not a key TorchServe reads (did you mean 'batchSize'?)"),
    ({"model_config": {"handlr": {"pool_size": 2}}}, "model_config.handlr: not a key TorchServe reads (did you mean 'handler'?)"),
    ({"model_config": {"handler": {"pool_sise": 2}}}, "(did you mean 'pool_size'?)"),
    # Regressions: these passed the check, then crashed the worker at start-up.
    ({"model_config": {"handler": {"precision": "fp8"}}}, "handler.precision must be one of float32, float16, bfloat16"),
    ({"model_config": {"handler": {"torch_threads": -3}}}, "handler.torch_threads must be >= 0"),
])
def test_a_bad_config_is_refused_naming_the_file_and_the_key(tmp_path, overrides, message):
    path = write_config(tmp_path, **overrides)
    with pytest.raises(ArchiveConfigError) as caught:
        load_spec(path, ROOT)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_check_mode_accepts_every_shipped_config(capsys):
    assert main(["--check", "--configs-only", "--root", str(ROOT)]) == 0
    assert "config(s) OK" in capsys.readouterr().out


def test_the_command_exits_2_with_the_message_on_a_bad_config(tmp_path, capsys):
    path = write_config(tmp_path, version=None)
    assert main([str(path), "--root", str(ROOT), "--check"]) == 2
    assert "version: missing (required)" in capsys.readouterr().err


def test_an_archive_carries_the_handlers_package_and_the_model_config(tmp_path):
    store = tmp_path / "store"
    assert main([str(ROOT / "archiver_configs" / "quickstart.yaml"), "--root", str(ROOT), "--model-store", str(store)]) == 0
    with zipfile.ZipFile(store / "quickstart.mar") as mar:
        names = set(mar.namelist())
        config = yaml.safe_load(mar.read("model-config.yaml"))
    assert {"handlers/__init__.py", "handlers/engine/batch_engine.py", "handlers/servers/torchserve.py", "handler.py"} <= names
    assert not any("__pycache__" in name for name in names)
    assert config["batchSize"] == 16 and config["handler"]["micro_batch_size"] == 4


def test_a_handler_file_with_two_handler_classes_fails_the_check_before_the_worker_does(tmp_path):
    """Regression: a handler file with two classes passed the check, then TorchServe refused it
    at every worker start ("Expected only one class in custom service code"). Helper classes
    beside one handler are served now (the entry module defines one class); two handlers are not."""
    handler = tmp_path / "two_classes.py"
    handler.write_text(
        "from handlers import MicroBatchHandler\n\n"
        "class Base(MicroBatchHandler):\n    pass\n\n"
        "class MyHandler(Base):\n    pass\n"
    )
    path = write_config(tmp_path, handler=str(handler))
    with pytest.raises(ArchiveConfigError) as caught:
        load_spec(path, ROOT)
    assert "two_classes.py defines 2 handler classes (Base, MyHandler)" in str(caught.value)
    assert "exactly one" in str(caught.value)


@pytest.mark.parametrize("handler, words", [
    ({"micro_batch_size": 32}, "handler.micro_batch_size 32 > batchSize 16"),
    ({"precision": "float16"}, "take effect on a GPU worker only"),
])
def test_settings_that_cannot_take_effect_are_warned_about_by_the_check(tmp_path, capsys, handler, words):
    """Regression: batchSize 16 with micro_batch_size 32, or float16 on a CPU, were accepted silently."""
    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())["model_config"]
    path = write_config(tmp_path, model_config={**config, "handler": handler})
    assert main(["--check", "--configs-only", "--root", str(ROOT), str(path)]) == 0
    assert words in capsys.readouterr().err


def write_project(folder: Path) -> Path:
    """A user's project outside the checkout: handler, model, build script and a config whose
    paths are relative to the config file."""
    folder.mkdir(parents=True)
    for name in ("handler.py", "model.py", "build.py"):
        (folder / name).write_text((ROOT / "examples" / "quickstart" / name).read_text())
    shutil.copytree(ROOT / "examples" / "quickstart" / "samples", folder / "samples")
    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    config.pop("root")
    config.update(handler="handler.py", model_file="model.py", serialized_file="out/weights.pt",
                  build=["python", "build.py", "out"], samples=["samples"])
    path = folder / "my_model.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_paths_start_at_the_config_files_folder_wherever_the_command_runs(tmp_path, monkeypatch):
    """Regression: paths were resolved against the current directory, so a config only worked
    from the folder it was written for (--root appeared only in --help)."""
    config = write_project(tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main([str(config), "--model-store", "store"]) == 0
    assert (tmp_path / "project" / "out" / "weights.pt").exists()  # the build ran in the config's folder
    assert (elsewhere / "store" / "quickstart.mar").exists()


def test_a_root_key_moves_where_the_paths_start_relative_to_the_config(tmp_path):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "handler.py").write_text((ROOT / "examples" / "quickstart" / "handler.py").read_text())
    config = project / "configs" / "my_model.yaml"
    config.write_text(yaml.safe_dump({"model_name": "mine", "version": "1", "root": "..", "handler": "handler.py",
                                      "model_config": {"batchSize": 2}}))
    spec = load_spec(config)
    assert spec.root == project.resolve()
    assert spec.handler == (project / "handler.py").resolve()


@pytest.mark.parametrize("overrides, message", [
    ({"root": "no/such/folder"}, "root: "),
    ({"root": 3}, "root: must be a folder path"),
    ({"handlr": "x.py"}, "handlr: not a known key (did you mean 'handler'?)"),
])
def test_a_bad_root_or_a_misspelled_top_level_key_is_refused(tmp_path, overrides, message):
    path = write_config(tmp_path, **overrides)
    with pytest.raises(ArchiveConfigError) as caught:
        load_spec(path)
    assert message in str(caught.value)


def test_every_shipped_config_checks_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    configs = sorted(str(p) for p in (ROOT / "archiver_configs").glob("*.yaml"))
    assert main(["--check", "--configs-only", *configs]) == 0
    assert f"{len(configs)} config(s) OK" in capsys.readouterr().out


def handler_importing_a_helper(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "features.py").write_text("def featurize(text):\n    return [len(text)]\n")
    handler = folder / "langid.py"
    handler.write_text("from features import featurize\nfrom handlers import MicroBatchHandler\n\n\n"
                       "class LangId(MicroBatchHandler):\n    pass\n")
    return handler


def test_a_handler_importing_a_module_listed_in_extra_files_checks_from_any_folder(tmp_path, monkeypatch):
    """Regression (found by a new user): the check imported the handler from wherever it ran, so a
    handler importing its own helper module (in extra_files, as TorchServe needs) crashed the
    check with a bare ModuleNotFoundError unless run from the project folder."""
    handler = handler_importing_a_helper(tmp_path / "project")
    path = write_config(tmp_path / "project", handler=str(handler), extra_files=[str(tmp_path / "project" / "features.py")])
    monkeypatch.chdir(tmp_path)
    assert load_spec(path, ROOT).handler == handler


def test_a_module_the_archive_will_not_hold_fails_the_check_in_one_line(tmp_path):
    """The handler imports features.py from its folder, but the config does not list it: the worker
    would fail with ModuleNotFoundError, so the check does, naming the fix."""
    handler = handler_importing_a_helper(tmp_path / "project")
    path = write_config(tmp_path / "project", handler=str(handler))
    with pytest.raises(ArchiveConfigError) as caught:
        load_spec(path, ROOT)
    message = str(caught.value)
    assert "handler: langid.py cannot be imported as the archive will hold it" in message
    assert "No module named 'features'" in message and "extra_files" in message


# -- Issue 19: one answer from any folder, every error in one run, weights that do not fit --------

QUICKSTART_HANDLER = (ROOT / "examples" / "quickstart" / "handler.py").read_text()
LABELLED_HANDLER = QUICKSTART_HANDLER.replace("import torch\n", "import torch\nfrom helper_labels import LABELS  # noqa: F401\n", 1)
# Imports the helper only when the model starts: the import check passes, the self-test must not.
LATE_IMPORTING_HANDLER = QUICKSTART_HANDLER.replace("class QuickstartHandler(MicroBatchHandler):\n", """\
class QuickstartHandler(MicroBatchHandler):
    def load_model(self, model_dir, device):
        import helper_labels  # noqa: F401 - beside the handler, in extra_files or not
        return super().load_model(model_dir, device)

""", 1)
assert LABELLED_HANDLER != QUICKSTART_HANDLER != LATE_IMPORTING_HANDLER


def write_labelled_project(folder: Path, handler_source: str, **overrides) -> Path:
    """A user's project whose handler imports its sibling helper_labels.py; the config lists no
    extra_files (unless ``overrides`` say so) and uses the quickstart model, weights and samples."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "helper_labels.py").write_text("LABELS = ['low', 'high']\n")
    (folder / "handler.py").write_text(handler_source)
    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    config.pop("root")
    config.pop("build")
    config.update({"handler": "handler.py", "model_file": str(ROOT / "examples" / "quickstart" / "model.py"),
                   "serialized_file": str(quickstart_weights()),
                   "samples": [str(ROOT / "examples" / "quickstart" / "samples")], **overrides})
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def quickstart_weights() -> Path:
    weights = ROOT / "build" / "quickstart" / "weights.pt"
    if not weights.exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart" / "build.py"), str(weights.parent)],
                       check=True, capture_output=True)
    return weights


def check_from(folder: Path, *configs: Path) -> subprocess.CompletedProcess:
    """``python -m handlers.archive CONFIG... --check`` run in ``folder``, as the README runs it."""
    return subprocess.run([sys.executable, "-m", "handlers.archive", *map(str, configs), "--check"],
                          cwd=folder, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_helper_missing_from_extra_files_fails_the_check_run_from_the_project_folder(tmp_path):
    """Regression (issue 19, finding 1): ``python -m`` puts the current folder on sys.path, so run
    in the project folder the check imported helper_labels.py from there and printed "1 config(s)
    OK", and the .mar built from it lacked the helper."""
    project = tmp_path / "project"
    config = write_labelled_project(project, LABELLED_HANDLER)
    result = check_from(project, config)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {config}: handler: handler.py cannot be imported as the archive will hold it"), line
    assert "No module named 'helper_labels'" in line and "extra_files" in line
    assert "config(s) OK" not in result.stdout


def test_the_self_test_imports_as_the_worker_does_too(tmp_path):
    """Regression (issue 19, finding 1): a handler that imports its helper only in load_model
    passed the self-test when the check ran in the project folder."""
    project = tmp_path / "project"
    config = write_labelled_project(project, LATE_IMPORTING_HANDLER)
    result = check_from(project, config)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {config}: the model cannot start: "), line
    assert "No module named 'helper_labels'" in line


def test_the_same_project_with_the_helper_in_extra_files_checks_from_its_folder(tmp_path):
    project = tmp_path / "project"
    config = write_labelled_project(project, LATE_IMPORTING_HANDLER, extra_files=["helper_labels.py"])
    result = check_from(project, config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "quickstart: self-test: 3 sample(s)" in result.stdout and "1 config(s) OK" in result.stdout


def test_a_helper_imported_earlier_in_the_process_does_not_satisfy_the_check(tmp_path, monkeypatch):
    """In-process: the helper importable from the current folder, and already in sys.modules
    (imported from there earlier), still fails the check; both are as they were afterwards."""
    project = tmp_path / "project"
    config = write_labelled_project(project, LABELLED_HANDLER)
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "helper_labels", raising=False)
    import helper_labels

    path_before = list(sys.path)
    with pytest.raises(ArchiveConfigError) as caught:
        load_spec(config)
    assert "No module named 'helper_labels'" in str(caught.value)
    assert sys.modules["helper_labels"] is helper_labels and sys.path == path_before


def test_every_error_of_a_config_is_reported_in_one_run(tmp_path, capsys):
    """Regression (issue 19, finding 4): the check stopped at a config's first error: two typos,
    two runs."""
    path = write_config(tmp_path, model_name="bad name!",
                        model_config={"batchSize": 0, "maxBatchDelay": 10, "handler": {"micro_batch_size": 2}})
    with pytest.raises(ArchiveConfigError) as caught:
        load_spec(path, ROOT)
    assert str(caught.value).splitlines() == [
        f"{path}: model_name: must be letters, digits, '_' or '-', starting with a letter, got 'bad name!'",
        f"{path}: model_config.batchSize: must be an integer >= 1, got 0",
    ]
    assert main([str(path), "--root", str(ROOT), "--check"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith(f"error: {path}: ") for line in errors), errors


def test_two_misspelled_keys_are_two_errors_each_naming_its_key(tmp_path):
    """A misspelled required key is one error (the typo, with "did you mean"), not two."""
    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    config["handlr"] = config.pop("handler")
    config["model_config"]["maxBatchDelai"] = config["model_config"].pop("maxBatchDelay")
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ArchiveConfigError) as caught:
        load_spec(path, ROOT)
    lines = str(caught.value).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{path}: handlr: not a known key (did you mean 'handler'?)")
    assert lines[1] == f"{path}: model_config.maxBatchDelai: not a key TorchServe reads (did you mean 'maxBatchDelay'?)"


def test_checks_that_depend_on_an_earlier_error_are_skipped(tmp_path):
    """A missing extra file is reported, not also the handler's import of it; a bad root is
    reported, not every path under it."""
    handler = handler_importing_a_helper(tmp_path / "project")
    path = write_config(tmp_path / "project", handler=str(handler), extra_files=[str(tmp_path / "project" / "featurs.py")],
                        build=None)  # nothing is built later: a missing file is an error
    with pytest.raises(ArchiveConfigError) as caught:
        load_spec(path, ROOT)
    [line] = str(caught.value).splitlines()
    assert "extra_files: " in line and "featurs.py does not exist (did you mean 'features.py'?)" in line
    path = write_config(tmp_path, root="no/such/folder", version=None)
    with pytest.raises(ArchiveConfigError) as caught:
        load_spec(path)
    assert [line.split(": ")[1] for line in str(caught.value).splitlines()] == ["version", "root"]


def test_every_config_with_errors_is_reported_in_one_run(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_config(tmp_path / "a", version=None)
    second = write_config(tmp_path / "b", model_name="9lives")
    assert main([str(first), str(second), "--root", str(ROOT), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"error: {first}: version: missing (required)" in err and f"error: {second}: model_name: " in err


@pytest.mark.parametrize("weights, words", [
    ({"linear.weight": (4, 8), "linear.bias": (4,)}, "size mismatch for linear.weight"),
    ({"weight": (4, 4), "bias": (4,)}, 'Missing key(s) in state_dict: "linear.weight"'),
])
def test_weights_that_do_not_fit_the_model_fail_the_check_in_one_line_naming_the_file(tmp_path, weights, words):
    """Regression (issue 19, finding 4): --check passed weights saved for another model (a
    state_dict of another shape); now it loads them and names the file."""
    import torch

    project = tmp_path / "project"
    config = write_labelled_project(project, QUICKSTART_HANDLER, serialized_file="weights.pt")
    torch.save({name: torch.zeros(shape) for name, shape in weights.items()}, project / "weights.pt")
    result = check_from(tmp_path, config)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {config}: serialized_file: {project / 'weights.pt'} does not fit the model"), line
    assert words in line


def test_a_weights_file_that_cannot_be_read_is_named_by_its_own_path_not_the_staged_copy(tmp_path):
    """From the new-user trial: the check named /tmp/check-XXXX/garbage.pt, its staged link."""
    project = tmp_path / "project"
    config = write_labelled_project(project, QUICKSTART_HANDLER, serialized_file="weights.pt")
    (project / "weights.pt").write_bytes(b"not a checkpoint")
    result = check_from(tmp_path, config)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"cannot read the weights {project / 'weights.pt'}: it is not a file torch.save wrote" in line, line
    assert "check-" not in line


# -- Issue 19, finding 2: the archive's entry module ----------------------------------------------

MISSING_MODULE_HANDLER = "import helper_not_in_the_archive\n\nfrom handlers import MicroBatchHandler\n\n\n" \
                         "class NeedsAHelper(MicroBatchHandler):\n    pass\n"


def load_as_the_worker(mar: Path, workdir: Path, monkeypatch):
    """Unpack ``mar`` and load it with TorchServe's own model loader, as a worker does (the
    model folder on sys.path)."""
    import json

    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import TsModelLoader

    with zipfile.ZipFile(mar) as archive:
        archive.extractall(workdir)
    manifest = json.loads((workdir / "MAR-INF" / "MANIFEST.json").read_text())
    monkeypatch.syspath_prepend(str(workdir))
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    return TsModelLoader().load("served_name", str(workdir), manifest["model"]["handler"], None, 4,
                                metrics_cache=metrics)


@pytest.fixture
def forget_modules():
    """Modules the worker-like loads import (handler_entry, handler) are forgotten after."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("handler", "helper")) and not name.startswith("handlers"):
            del sys.modules[name]


def test_the_archive_handler_is_an_entry_that_serves_the_users_class(tmp_path, monkeypatch, forget_modules):
    from handlers.packaging.archive import archive_config

    mar = archive_config(ROOT / "archiver_configs" / "quickstart.yaml", tmp_path / "store", root=ROOT)
    with zipfile.ZipFile(mar) as archive:
        assert {"handler.py", "handler_entry.py"} <= set(archive.namelist())
    service = load_as_the_worker(mar, tmp_path / "unpacked", monkeypatch)
    handler = service._entry_point.__self__
    assert type(handler).__name__ == "QuickstartHandler" and type(handler).__module__ == "handler_entry"
    assert handler.initialized
    handler.close()


def test_a_module_missing_from_the_archive_leaves_the_one_line_in_the_worker(tmp_path, monkeypatch, caplog,
                                                                              forget_modules):
    """Regression (issue 19, finding 2): TorchServe imports the handler file before our code runs,
    so a ModuleNotFoundError left only tracebacks (and a restart loop), no "cannot start" line."""
    from handlers.packaging.archive import archive_config

    handler = tmp_path / "needs_helper.py"
    handler.write_text(MISSING_MODULE_HANDLER)
    mar = archive_config(ROOT / "archiver_configs" / "quickstart.yaml", tmp_path / "store", root=ROOT,
                         model_name="missing", handler=handler)
    service = load_as_the_worker(mar, tmp_path / "unpacked", monkeypatch)  # issue 30: the worker stays up
    line = ("microbatch-handlers: model served_name cannot start: ModuleNotFoundError: No module named "
            "'helper_not_in_the_archive'")
    lines = [r.getMessage() for r in caplog.records if "cannot start" in r.getMessage()]
    assert lines == [line]
    # Issue 30, part 2: each request is answered at once with a 503 carrying the line.
    from ts.context import RequestProcessor

    service.context.request_processor = [RequestProcessor({})]
    [payload] = service._entry_point([{"body": b"{}"}], service.context)
    assert service.context.get_response_status(0)[0] == 503
    assert json.loads(payload) == {"code": 503, "type": "ModelCannotStart", "message": line}


@pytest.mark.parametrize("source, expected", [
    ("def handle(data, context):\n    return ['ok'] * len(data or [])\n", {"handle"}),
    ("class A:\n    pass\n\n\nclass B:\n    pass\n", {"HandlerCannotStart"}),
    ("def broken(:\n", {"HandlerCannotStart"}),
])
def test_the_entry_serves_a_handle_function_and_refuses_in_one_line_what_torchserve_refuses(
        tmp_path, source, expected, forget_modules):
    from handlers.packaging.torchserve_entry import entry_points

    (tmp_path / "handler_x.py").write_text(source)
    names = entry_points("handler_x_entry", str(tmp_path / "handler_x_entry.py"), "handler_x.py")
    assert set(names) == expected
    if expected == {"HandlerCannotStart"}:
        cannot_start = names["HandlerCannotStart"]()
        with pytest.raises((ValueError, SyntaxError)):
            cannot_start.initialize(type("Context", (), {"model_name": "x"})())
