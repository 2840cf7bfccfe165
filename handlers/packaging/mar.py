"""A ``.mar`` archive read for a server other than TorchServe (Ray Serve, the Ray package export):
its files, its manifest (``MAR-INF/MANIFEST.json``), its model config (``batchSize``,
``maxBatchDelay``, ``responseTimeout``, the ``handler:`` section) and the model config's
``ray_serve:`` section when it has one. Archives of ``python -m handlers.archive`` and any other
``torch-model-archiver`` output alike; every problem of one archive is reported at once. Standard
library and yaml only: which class serves it is decided where it is served
(:mod:`handlers.servers.mar_handler`).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from handlers.engine.settings import ModelFiles
from handlers.packaging.server_sections import RAY_SECTION, check_ray_section, response_timeout

MANIFEST = "MAR-INF/MANIFEST.json"
MAR_SUFFIX = ".mar"


class MarError(ValueError):
    """A ``.mar`` cannot be served: one line per problem, each naming the archive."""


@dataclass
class MarSpec:
    """One archive, read and checked."""

    source: Path
    model_name: str
    version: str
    manifest: dict
    model_config: dict  # the archive's model-config yaml (empty when it has none)
    files: dict = field(repr=False, default_factory=dict)  # name in the archive -> bytes
    ray_serve: dict = field(default_factory=dict)  # the model config's ray_serve: section, checked

    @property
    def handler(self) -> str:
        """The manifest's handler: a file in the archive, ``module:function``, or a stock name."""
        return self.manifest["model"]["handler"]


def is_mar(path: Path) -> bool:
    return Path(path).suffix == MAR_SUFFIX


def load_mar(path: Path) -> MarSpec:
    """Read ``path``; raises :class:`MarError` (every problem, one per line)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            files = {info.filename: archive.read(info) for info in archive.infolist() if not info.is_dir()}
    except (OSError, zipfile.BadZipFile) as exc:
        raise MarError(f"{path}: not a readable .mar (a zip written by torch-model-archiver): {exc}") from None
    problems = []
    manifest = _manifest(path, files, problems)
    model = manifest.get("model") or {}
    config_file = model.get("configFile")
    model_config: dict = {}
    if config_file:
        model_config = _model_config(path, files, config_file, problems)
    ray_serve: dict = {}
    try:
        response_timeout(model_config)
        ray_serve = check_ray_section(model_config.get(RAY_SECTION))
    except ValueError as exc:
        problems.append(f"{path}: {config_file}: {exc}")
    for key in ("modelName", "handler"):
        if not isinstance(model.get(key), str) or not model.get(key):
            problems.append(f"{path}: {MANIFEST} has no model.{key}")
    for key in ("serializedFile", "modelFile"):
        if model.get(key) and model[key] not in files:
            problems.append(f"{path}: {MANIFEST} names model.{key} {model[key]!r}, which the archive does not hold")
    if problems:
        raise MarError("\n".join(problems))
    return MarSpec(source=path, model_name=model["modelName"], version=str(model.get("modelVersion", "1.0")),
                   manifest=manifest, model_config=model_config, files=files, ray_serve=ray_serve)


def _manifest(path: Path, files: dict, problems: list) -> dict:
    if MANIFEST not in files:
        problems.append(f"{path}: no {MANIFEST}: not a torch-model-archiver archive (or one with --archive-format "
                        f"no-archive; serve its folder's files with an archiver config instead)")
        return {}
    try:
        manifest = json.loads(files[MANIFEST])
    except ValueError as exc:
        problems.append(f"{path}: {MANIFEST} is not JSON: {exc}")
        return {}
    if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), dict):
        problems.append(f"{path}: {MANIFEST} has no model section")
        return {}
    return manifest


def _model_config(path: Path, files: dict, config_file: str, problems: list) -> dict:
    if config_file not in files:
        problems.append(f"{path}: {MANIFEST} names configFile {config_file!r}, which the archive does not hold")
        return {}
    try:
        config: Optional[Any] = yaml.safe_load(files[config_file])
    except yaml.YAMLError as exc:
        problems.append(f"{path}: {config_file} is not YAML: {' '.join(str(exc).split())}")
        return {}
    if config is not None and not isinstance(config, dict):
        problems.append(f"{path}: {config_file} must be a mapping of model-config keys, got {type(config).__name__}")
        return {}
    return config or {}


def model_files_of(manifest: dict) -> ModelFiles:
    """The model files a manifest names (``--model-file``, ``--serialized-file``)."""
    model = manifest.get("model") or {}
    return ModelFiles(model_file=model.get("modelFile"), serialized_file=model.get("serializedFile"))
