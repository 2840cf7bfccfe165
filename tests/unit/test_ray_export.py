"""python -m handlers.export_ray writes a Ray Serve package (config.yaml, deployment.py, handlers/,
models/<name>.mar, code/requirements.txt) from a .mar or an archiver config, without starting Ray
(tests/integration/test_ray_package.py starts one with serve run in a fresh venv)."""

import tarfile

import yaml

from handlers.export_ray import export, main, serve_config, write_tar
from handlers.packaging.mar import load_mar
from handlers.packaging.requirements import imported_modules, requirements_for
from tests.legacy_mar import build_legacy_mar


def test_a_legacy_mar_is_exported_with_torchserve_in_its_requirements(tmp_path):
    mar = build_legacy_mar(tmp_path)
    out = export(mar, tmp_path / "package", port=8080, sagemaker=False)
    assert sorted(p.name for p in out.iterdir()) == ["code", "config.yaml", "deployment.py", "handlers", "models"]
    assert load_mar(out / "models" / "legacy.mar").model_name == "legacy"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["applications"] == [{"name": "legacy", "route_prefix": "/predictions/legacy",
                                       "import_path": "deployment:model", "args": {"mar": "models/legacy.mar"}}]
    requirements = (out / "code" / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("torchserve==") for line in requirements), requirements  # the handler imports ts
    assert any(line.startswith("ray[serve]==") for line in requirements)
    compile((out / "deployment.py").read_text(), "deployment.py", "exec")


def test_the_tar_holds_the_package_at_its_root(tmp_path):
    out = export(build_legacy_mar(tmp_path), tmp_path / "package")
    with tarfile.open(write_tar(out, tmp_path / "model.tar.gz")) as tar:
        names = set(tar.getnames())
    assert {"config.yaml", "deployment.py", "code/requirements.txt", "models/legacy.mar"} <= names


def test_sagemaker_routes_and_a_remote_working_dir_are_in_the_serve_config(tmp_path):
    config = yaml.safe_load(serve_config("m", "models/m.mar", "0.0.0.0", 8080, True, "https://example.com/pkg.zip"))
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8080}
    [model, sagemaker] = config["applications"]
    assert (sagemaker["route_prefix"], sagemaker["args"]) == ("/", {"model": "m"})
    assert model["runtime_env"] == sagemaker["runtime_env"] == {"working_dir": "https://example.com/pkg.zip"}


def test_the_command_refuses_a_folder_that_is_not_empty_and_a_broken_mar(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main([str(build_legacy_mar(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    assert "is not empty" in capsys.readouterr().err
    broken = tmp_path / "broken.mar"
    broken.write_text("no zip")
    assert main([str(broken), "--out", str(tmp_path / "new")]) == 2
    assert "not a readable .mar" in capsys.readouterr().err


def test_requirements_name_what_the_archive_imports_and_what_is_not_installed():
    sources = {"handler.py": b"import json\nimport torch\nfrom ts.utils.util import PredictionException\n"
                             b"import model\nimport no_such_module_here\nfrom . import near\n",
               "model.py": b"import numpy as np\n", "handlers/core/x.py": b"import transformers\n"}
    assert imported_modules(sources) == {"torch", "ts", "numpy", "no_such_module_here"}
    text = requirements_for(sources)
    assert "torchserve==" in text and "transformers" not in text
    assert "# no_such_module_here: imported by the archive, not installed" in text
    assert text.count("numpy") == 1
