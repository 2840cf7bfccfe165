"""The archive command checks configs before it runs torch-model-archiver."""

import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

from handlers.archive import ArchiveConfigError, load_spec, main

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
    assert main(["--check", "--root", str(ROOT)]) == 0
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
    assert {"handlers/__init__.py", "handlers/_engine.py", "handlers/_torchserve.py", "handler.py"} <= names
    assert not any("__pycache__" in name for name in names)
    assert config["batchSize"] == 16 and config["handler"]["micro_batch_size"] == 4


def test_a_handler_file_with_two_classes_fails_the_check_before_torchserve_crash_loops(tmp_path):
    """Regression: a handler file with a model class and a handler class passed the check, then
    TorchServe refused it at every worker start ("Expected only one class in custom service code")."""
    handler = tmp_path / "two_classes.py"
    handler.write_text(
        "import torch\nfrom handlers import MicroBatchHandler\n\n"
        "class Net(torch.nn.Module):\n    pass\n\n"
        "class MyHandler(MicroBatchHandler):\n    pass\n"
    )
    path = write_config(tmp_path, handler=str(handler))
    with pytest.raises(ArchiveConfigError) as caught:
        load_spec(path, ROOT)
    assert "two_classes.py defines 2 classes (MyHandler, Net)" in str(caught.value)
    assert "exactly one class" in str(caught.value)


@pytest.mark.parametrize("handler, words", [
    ({"micro_batch_size": 32}, "handler.micro_batch_size 32 > batchSize 16"),
    ({"precision": "float16"}, "take effect on a GPU worker only"),
])
def test_settings_that_cannot_take_effect_are_warned_about_by_the_check(tmp_path, capsys, handler, words):
    """Regression: batchSize 16 with micro_batch_size 32, or float16 on a CPU, were accepted silently."""
    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())["model_config"]
    path = write_config(tmp_path, model_config={**config, "handler": handler})
    assert main(["--check", "--root", str(ROOT), str(path)]) == 0
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
    assert main(["--check", *configs]) == 0
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
