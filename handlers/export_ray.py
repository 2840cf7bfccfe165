"""Export an archiver config or a ``.mar`` as a Ray Serve application package: the shape KubeRay's
``RayService`` and AWS's Ray Serve inference containers take, a folder (and ``model.tar.gz``) with

- ``config.yaml``: the Serve config (``serve run config.yaml``, ``serve deploy config.yaml``): the
  model at ``/predictions/<model_name>`` and, unless ``--no-sagemaker``, SageMaker's ``GET /ping``
  and ``POST /invocations`` at ``/``;
- ``deployment.py``: the application builders the config names (``deployment:model``, ...);
- ``handlers/``: this package's source (a fresh venv does not have it);
- ``models/<model_name>.mar``: the archive (built by the real ``torch-model-archiver`` from a
  config), served from its own manifest and model config as ``python -m handlers.ray_serve`` does;
- ``code/requirements.txt``: what the code imports, pinned to the versions this was tested with.

Usage::

    python -m handlers.export_ray CONFIG_OR_MAR --out DIR [--tar model.tar.gz] [--host 127.0.0.1] [--port 8000]

then, from DIR, in a venv with ``pip install -r code/requirements.txt``: ``serve run config.yaml``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from handlers.packaging.archive import (PACKAGE_DIR, ArchiveConfigError, archive, build_artefacts, load_spec,
                                        print_lines, with_aot_packages)
from handlers.packaging.mar import MarError, is_mar, load_mar
from handlers.packaging.requirements import requirements_for

MODELS = "models"
SAGEMAKER_APP = "sagemaker"

DEPLOYMENT = '''"""The Ray Serve application builders of this package (written by python -m handlers.export_ray;
config.yaml names them). Paths in their args are relative to this folder."""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def model(args: dict):
    """One .mar at /predictions/<model_name>: args mar=models/<name>.mar [api_key_file=PATH]."""
    from handlers.ray_serve import app

    return app({**args, "config": str(HERE / args["mar"])})


def sagemaker(args: dict):
    """SageMaker's GET /ping and POST /invocations, for the model named by args model=NAME
    [api_key_file=PATH]."""
    from handlers.ray_serve import api_key_of
    from handlers.servers.ray_sagemaker import sagemaker_app

    return sagemaker_app(args["model"], api_key_of(args))
'''


def export(source: Path, out: Path, host: str = "127.0.0.1", port: int = 8000, sagemaker: bool = True,
           root: Optional[Path] = None, working_dir_uri: Optional[str] = None) -> Path:
    """Write the package for ``source`` (an archiver config or a ``.mar``) into ``out`` (created;
    it must not exist or be empty). Returns ``out``. Raises ArchiveConfigError or MarError."""
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: export into a new folder")
    models = out / MODELS
    models.mkdir()
    if is_mar(source):
        spec = load_mar(source)
        mar = models / f"{spec.model_name}.mar"
        shutil.copy2(source, mar)
    else:
        config = load_spec(source, root)
        build_artefacts(config)
        with tempfile.TemporaryDirectory(prefix="mbh-aot-") as aot_folder:
            config, lines = with_aot_packages(config, Path(aot_folder))
            print_lines(lines)
            mar = archive(config, models)
        spec = load_mar(mar)
    shutil.copytree(PACKAGE_DIR, out / "handlers", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (out / "deployment.py").write_text(DEPLOYMENT)
    (out / "config.yaml").write_text(serve_config(spec.model_name, mar.relative_to(out), host, port, sagemaker,
                                                  working_dir_uri))
    (out / "code").mkdir()
    sources = {name: content for name, content in spec.files.items() if name.endswith(".py")}
    (out / "code" / "requirements.txt").write_text(requirements_for(sources))
    return out


def serve_config(model_name: str, mar: Path, host: str, port: int, sagemaker: bool,
                 working_dir_uri: Optional[str] = None) -> str:
    """The Serve config's text (a comment, then Ray's ServeDeploySchema as YAML)."""
    applications = [{"name": model_name, "route_prefix": f"/predictions/{model_name}",
                     "import_path": "deployment:model", "args": {"mar": str(mar)}}]
    if sagemaker:
        applications.append({"name": SAGEMAKER_APP, "route_prefix": "/", "import_path": "deployment:sagemaker",
                             "args": {"model": model_name}})
    if working_dir_uri:  # KubeRay: the package as a zip the nodes download
        for application in applications:
            application["runtime_env"] = {"working_dir": working_dir_uri}
    config = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
              "applications": applications}
    header = (f"# Ray Serve config for {model_name}, written by python -m handlers.export_ray.\n"
              f"# From this folder: serve run config.yaml (or ray start --head here, then serve deploy config.yaml).\n"
              f"# Token authorisation: add api_key_file: PATH to each application's args (docs/from_torchserve.md).\n")
    return header + yaml.safe_dump(config, sort_keys=False)


def write_tar(folder: Path, tar_path: Path) -> Path:
    """``folder``'s contents at the root of a gzipped tar (SageMaker unpacks model.tar.gz so)."""
    with tarfile.open(tar_path, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return tar_path


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers.export_ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="an archiver config (.yaml) or a .mar")
    parser.add_argument("--out", type=Path, required=True, help="the package's folder (new or empty)")
    parser.add_argument("--tar", type=Path, default=None, help="also write the folder as this .tar.gz (model.tar.gz)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address Serve's HTTP proxy binds (0.0.0.0 in a container; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="Serve's HTTP port (SageMaker: 8080)")
    parser.add_argument("--root", type=Path, default=None,
                        help="where a config's paths start (as for python -m handlers.archive)")
    parser.add_argument("--no-sagemaker", action="store_true", help="leave out SageMaker's /ping and /invocations")
    parser.add_argument("--working-dir-uri", default=None,
                        help="a remote zip of the package (https://, s3://, gs://) for the nodes to download: "
                             "KubeRay's RayService, where the package is not on the nodes' disk")
    args = parser.parse_args(argv)
    try:
        out = export(args.source, args.out, args.host, args.port, not args.no_sagemaker, args.root,
                     args.working_dir_uri)
    except (ArchiveConfigError, MarError) as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: from there, pip install -r code/requirements.txt, then serve run config.yaml", flush=True)
    if args.tar:
        print(f"wrote {write_tar(out, args.tar)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
