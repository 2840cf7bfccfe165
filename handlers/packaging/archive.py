"""Archiver configs to ``.mar`` archives: a config read and checked (:func:`load_spec`, every
problem at once), its artefacts built, its model self-tested as the worker will start it
(:func:`self_test`: from a folder laid out as the archive, with nothing of the current folder or
the config's on ``sys.path``), and the archive written by the real ``torch-model-archiver``
(:func:`archive`). The command is ``python -m handlers.archive``.

Each archive carries the ``handlers`` package, so it runs on a stock TorchServe whose Python has
torch, numpy and Pillow but not this project. Paths in a config are relative to the config
file's folder, or to its ``root:`` (itself relative to that folder); ``--root DIR`` overrides
both. A config's ``build`` command runs in that same folder. The archive's TorchServe
``--handler`` is a generated entry module (``<handler>_entry.py``, see
:mod:`handlers.packaging.torchserve_entry`) that loads the config's handler file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from handlers.core.aot import AOT_FOLDER, build_packages
from handlers.core.compiled import read_compile, with_pt2
from handlers.core.handler_file import classes_defined_in, handler_class_of, load_handler_class, load_python_file
from handlers.engine.settings import ConfigError, ModelFiles, did_you_mean
from handlers.packaging.queue_sizing import BUDGET_KEY, QueuePlan, budget_of, model_cost, plan_queue, served_time
from handlers.packaging.server_sections import check_model_config, check_ray_section, read_settings, response_timeout
from handlers.packaging.torchserve_entry import entry_file_name, entry_source

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the handlers package
SPEC_KEYS = ("model_name", "version", "root", "handler", "serialized_file", "model_file", "extra_files", "build",
             "model_config", "ray_serve", "samples")
NAME_RULE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
# TorchServe's keys of a model config (the ones this tool checks; others pass through).
POSITIVE_INT_KEYS = ("batchSize", "minWorkers", "maxWorkers", "responseTimeout")
NON_NEGATIVE_INT_KEYS = ("maxBatchDelay",)
# Every key TorchServe 0.12 reads from a model config, and this project's section: an unknown key
# that is one of these in another case, or a near misspelling, is refused (TorchServe would
# silently ignore it); other unknown keys pass through (a handler may read its own).
MODEL_CONFIG_KEYS = (
    "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout", "deviceType",
    "deviceIds", "parallelLevel", "parallelType", "torchrun", "maxRetryTimeoutInSec", "clientTimeoutInMills",
    "jobQueueSize", "useJobTicket", "continuousBatching", "sequenceMaxIdleMSec", "maxSequenceJobQueueSize",
    "maxNumSequence", "asyncCommunication", "handler",
)


@dataclass
class ArchiveSpec:
    """One model to archive, as read from its config file."""

    source: Path
    root: Path  # where the config's paths start, and where its build command runs
    model_name: str
    version: str
    handler: Path
    model_config: dict
    serialized_file: Optional[Path] = None
    model_file: Optional[Path] = None
    extra_files: list = field(default_factory=list)
    build: Optional[list] = None
    ray_serve: dict = field(default_factory=dict)  # how to serve it on Ray Serve (handlers.ray_serve)
    # Sample requests (path, content type or None) for the start-up self-test (handlers.core.self_test).
    samples: list = field(default_factory=list)


class ArchiveConfigError(ValueError):
    """A config file is wrong; the message names the file, the key and the problem, one line per
    error (every error of the config, not only the first)."""


class _Skip(Exception):
    """A check found an error (recorded): the checks that depend on it are skipped."""


class _Problems:
    """The errors found in one config, each as ``<file>: <key>: <problem>``."""

    def __init__(self, path: Path):
        self.path = path
        self.lines = []

    def add(self, key: str, problem: str) -> None:
        self.lines.append(f"{self.path}: {key}: {problem}")

    def fail(self, key: str, problem: str):
        """Record the error and end the check that found it."""
        self.add(key, problem)
        raise _Skip

    def attempt(self, check, *args):
        """``(True, check(*args))``, or ``(False, None)`` when the check failed."""
        try:
            return True, check(*args)
        except _Skip:
            return False, None


REQUIRED_KEYS = ("model_name", "version", "handler", "model_config")


def load_spec(path: Path, root: Optional[Path] = None) -> ArchiveSpec:
    """Read and check one archiver config. Its paths start from ``root`` when given, else from
    the config's own ``root:`` key or folder. Every error is reported (one per line of the
    ArchiveConfigError), except those that follow from an earlier one."""
    path = Path(path).resolve()
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ArchiveConfigError(f"{path}: cannot read it as YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ArchiveConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    problems = _Problems(path)
    fail = problems.fail

    unknown = [key for key in raw if key not in SPEC_KEYS]
    for key in unknown:
        problems.add(key, f"not a known key{did_you_mean(key, SPEC_KEYS)}; known keys: {', '.join(sorted(SPEC_KEYS))}")
    for key in REQUIRED_KEYS:
        # A misspelled required key is one error, the misspelling's ("did you mean 'handler'?").
        if key not in raw and not any(did_you_mean(typo, [key]) for typo in unknown):
            problems.add(key, "missing (required)")
    name = raw.get("model_name")
    if "model_name" in raw and not (isinstance(name, str) and NAME_RULE.match(name)):
        problems.add("model_name", f"must be letters, digits, '_' or '-', starting with a letter, got {name!r}")
    build = raw.get("build")
    build_ok = build is None or (isinstance(build, list) and all(isinstance(a, str) for a in build))
    if not build_ok:
        problems.add("build", f"must be a command as a list of strings, got {build!r}")

    root_ok, root = (True, root) if root is not None else problems.attempt(_own_root, path, raw.get("root", "."), fail)
    root = Path(root).resolve() if root_ok else None

    def existing(key: str, value: Any, must_exist: bool) -> Path:
        if not isinstance(value, str) or not value:
            fail(key, f"must be a path, got {value!r}")
        resolved = root / value
        if must_exist and not resolved.exists():
            nearby = [p.name for p in resolved.parent.iterdir()] if resolved.parent.is_dir() else []
            fail(key, f"{resolved} does not exist{did_you_mean(resolved.name, nearby)}")
        return resolved

    def path_of(key: str, value: Any, must_exist: bool):
        """``(ok, path)``; not ok when the root is unknown (its error is reported already)."""
        return problems.attempt(existing, key, value, must_exist) if root_ok else (False, None)

    # Built artefacts may be missing until the build command has run (or a build that is wrong
    # would have run: its own error says so).
    built_later = build is not None
    handler_ok, handler = path_of("handler", raw["handler"], True) if "handler" in raw else (False, None)
    _, serialized = path_of("serialized_file", raw["serialized_file"], not built_later) \
        if raw.get("serialized_file") else (True, None)
    model_file_ok, model_file = path_of("model_file", raw["model_file"], True) if raw.get("model_file") else (True, None)
    extra = [path_of("extra_files", f, not built_later) for f in raw.get("extra_files") or []]
    for ok, extra_path in extra:
        if handler_ok and ok and extra_path.name == entry_file_name(handler.name):
            problems.add("extra_files", f"{extra_path} has the name of the archive's entry module (its TorchServe "
                                        f"--handler, which loads {handler.name}): rename it")
    config_ok, model_config = problems.attempt(_checked_model_config, raw["model_config"], problems) \
        if "model_config" in raw else (False, None)
    _, ray_serve = problems.attempt(_checked_ray_section, raw.get("ray_serve"), problems)
    samples = _checked_samples(raw.get("samples"), path_of, not built_later, problems) if root_ok else []

    if not (handler_ok and model_file_ok and all(ok for ok, _ in extra)):
        raise ArchiveConfigError("\n".join(problems.lines))  # the handler's import needs its files (not the weights)
    spec = ArchiveSpec(
        source=path,
        root=root,
        model_name=name,
        version=str(raw.get("version")),
        handler=handler,
        model_config=model_config or {},
        serialized_file=serialized,
        model_file=model_file,
        extra_files=[p for _, p in extra],
        build=build if build_ok else None,
        ray_serve=ray_serve or {},
        samples=samples,
    )
    class_ok, handler_class = problems.attempt(_handler_class, spec, fail)
    if class_ok and isinstance(raw["model_config"], dict):
        # The handler: section is checked even when TorchServe's keys have errors: all at once.
        checked = model_config if config_ok else _handler_part(raw["model_config"])
        try:
            if handler_class is not None:  # the checks start-up makes: one schema for both
                check_model_config(checked, handler_class)
            else:
                read_settings(checked)
        except ConfigError as exc:
            for line in exc.problems:
                problems.add("model_config", line)
    if problems.lines:
        raise ArchiveConfigError("\n".join(problems.lines))
    return spec


def _checked_samples(samples: Any, path_of, must_exist: bool, problems: _Problems) -> list:
    """``samples:`` as ``[(path, content type or None)]``: each entry a path (a file, or a folder
    of sample files) or ``{file: PATH, content_type: TYPE}``. Each wrong entry is an error."""
    if samples is None:
        return []
    if not isinstance(samples, list):
        problems.add("samples", f"must be a list of sample request files, got {samples!r}")
        return []
    checked = []
    for entry in samples:
        content_type = None
        if isinstance(entry, dict):
            unknown = set(entry) - {"file", "content_type"}
            if unknown or "file" not in entry:
                problems.add("samples", f"an entry is a path or {{file: PATH, content_type: TYPE}}, got {entry!r}")
                continue
            entry, content_type = entry["file"], entry.get("content_type")
        ok, path = path_of("samples", entry, must_exist)
        if not ok:
            continue
        if path.is_dir():
            checked += [(file, content_type) for file in sorted(path.iterdir()) if file.is_file()]
        else:
            checked.append((path, content_type))
    return checked


def sample_files(spec: ArchiveSpec) -> dict:
    """The archive's sample files, ``{path inside the model folder: bytes}``, with their index
    (the folder :func:`handlers.core.self_test.load_samples` reads at start-up)."""
    import json

    from handlers.core.self_test import SAMPLES_DIR, SAMPLES_INDEX, content_type_of

    if not spec.samples:
        return {}
    files, index = {}, []
    for number, (path, content_type) in enumerate(spec.samples, 1):
        name = f"{number:02d}_{path.name}"
        files[f"{SAMPLES_DIR}/{name}"] = path.read_bytes()
        # "source": the name the self-test's messages give it (the file as the config names it).
        source = path.relative_to(spec.root).as_posix() if path.is_relative_to(spec.root) else path.name
        index.append({"file": name, "source": source, "content_type": content_type or content_type_of(path.name)})
    files[f"{SAMPLES_DIR}/{SAMPLES_INDEX}"] = json.dumps(index, indent=1).encode()
    return files


def _own_root(config_path: Path, value: Any, fail) -> Path:
    if not isinstance(value, str) or not value:
        fail("root", f"must be a folder path (relative to the config's folder), got {value!r}")
    root = (config_path.parent / value).resolve()
    if not root.is_dir():
        fail("root", f"{root} is not a folder")
    return root


def ineffective_settings(spec: ArchiveSpec) -> list:
    """Settings that are valid but cannot take effect, each as a sentence that says why."""
    config = spec.model_config
    handler = config.get("handler") or {}
    notes = []
    batch_size, micro = config.get("batchSize", 1), handler.get("micro_batch_size")
    if isinstance(micro, int) and not isinstance(micro, bool) and micro > batch_size:
        notes.append(f"handler.micro_batch_size {micro} > batchSize {batch_size}: TorchServe never hands over a batch "
                     f"larger than {batch_size}, so micro-batches are at most {batch_size}")
    if batch_size == 1 and handler.get("micro_batch_strategy", "static") != "static":
        notes.append("handler.micro_batch_strategy has nothing to size with batchSize 1")
    if handler.get("precision", "float32") != "float32" or handler.get("channels_last"):
        notes.append("handler.precision and handler.channels_last take effect on a GPU worker only")
    return notes


def _checked_ray_section(section: Any, problems: _Problems) -> dict:
    try:
        return check_ray_section(section)
    except ValueError as exc:
        for line in str(exc).splitlines():
            problems.add("ray_serve", line)
        raise _Skip from None


def _handler_part(config: dict) -> dict:
    """The parts of a model config with errors that the ``handler:`` section's check reads: the
    section, and ``responseTimeout`` where it is valid (its own error is reported already)."""
    part = {key: config[key] for key in ("handler",) if key in config}
    timeout = config.get("responseTimeout")
    if isinstance(timeout, int) and not isinstance(timeout, bool) and timeout >= 1:
        part["responseTimeout"] = timeout
    return part


def _checked_model_config(config: Any, problems: _Problems) -> dict:
    """The model config, each wrong key an error; ends the check (``_Skip``) when any is."""
    if not isinstance(config, dict):
        problems.fail("model_config", f"must be a mapping, got {config!r}")
    found = len(problems.lines)
    for key in config:
        hint = did_you_mean(key, MODEL_CONFIG_KEYS) if key not in MODEL_CONFIG_KEYS else ""
        if hint:
            problems.add(f"model_config.{key}", f"not a key TorchServe reads{hint}")
    valid = {}
    for key in POSITIVE_INT_KEYS + NON_NEGATIVE_INT_KEYS:
        if key in config:
            value = config[key]
            minimum = 0 if key in NON_NEGATIVE_INT_KEYS else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                problems.add(f"model_config.{key}", f"must be an integer >= {minimum}, got {value!r}")
            else:
                valid[key] = value
    if valid.get("minWorkers", 1) > valid.get("maxWorkers", valid.get("minWorkers", 1)):
        problems.add("model_config.minWorkers", f"must not exceed maxWorkers ({config['maxWorkers']})")
    if len(problems.lines) > found:
        raise _Skip
    return dict(config)


def _handler_class(spec: ArchiveSpec, fail):
    """The handler class defined in the spec's handler file, imported as the worker will import
    it: beside the archive's other files and nothing else of the project's folder. Helper classes
    may sit beside the one handler class (the archive's entry module, which TorchServe loads,
    defines one class); a file with several and not exactly one handler fails, as the worker
    would. None for a file with no class (a module-level ``handle`` function, which TorchServe
    also accepts) or a class that is not ours."""
    handler_file = spec.handler
    with staged_model_dir(spec) as staged:
        try:
            module = load_python_file(str(Path(staged) / handler_file.name))
        except Exception as exc:  # noqa: BLE001 - any import error of a user's file, in one line
            fail("handler", f"{handler_file.name} cannot be imported as the archive will hold it "
                            f"({type(exc).__name__}: {exc}); a module it imports must be in extra_files "
                            f"(or installed in TorchServe's Python)")
        if not classes_defined_in(module):
            return None
        try:  # the archive's entry module serves it: helper classes may sit beside the handler
            handler_class = handler_class_of(module, handler_file.name)
        except ConfigError as exc:
            fail("handler", str(exc))
    return handler_class if hasattr(handler_class, "read_config") else None


@contextlib.contextmanager
def staged_model_dir(spec: ArchiveSpec):
    """A temporary model folder laid out as the archive will be (its files linked, not copied),
    importable as the worker's model_dir is, and nothing of the project besides: see
    :func:`imports_as_the_worker`. Modules imported from it are forgotten after."""
    with tempfile.TemporaryDirectory(prefix="check-") as staged:
        for path in (spec.handler, spec.model_file, spec.serialized_file, *spec.extra_files):
            if path is not None and path.exists():  # built artefacts may come later
                (Path(staged) / path.name).symlink_to(path)  # the archive's layout, without copying weights
        if all(path.exists() for path, _ in spec.samples):
            for name, content in sample_files(spec).items():
                (Path(staged) / name).parent.mkdir(exist_ok=True)
                (Path(staged) / name).write_bytes(content)
        project = {Path.cwd(), spec.source.parent, spec.root}
        project |= {p.parent for p in (spec.handler, spec.model_file, spec.serialized_file, *spec.extra_files) if p}
        with imports_as_the_worker(staged, project):
            yield staged


@contextlib.contextmanager
def imports_as_the_worker(model_dir: str, project_folders):
    """Import in this process as a TorchServe worker will: ``model_dir`` first on ``sys.path``,
    then the interpreter's own paths, and nothing of ``project_folders`` (the current folder, the
    config's, the files' folders: ``python -m`` and pytest put them on ``sys.path``). Modules
    imported from those folders before are hidden meanwhile (so that an earlier import does not
    satisfy the archive's), except this package (the archive carries it). Restored after;
    modules imported from ``model_dir`` are forgotten."""
    folders = {os.path.realpath(folder) for folder in project_folders}
    saved_path = list(sys.path)
    hidden = {name: module for name, module in list(sys.modules.items()) if _imported_from(name, module, folders)}
    sys.path[:] = [model_dir] + [entry for entry in saved_path if os.path.realpath(entry or ".") not in folders]
    for name in hidden:
        del sys.modules[name]
    loaded_before = set(sys.modules)
    try:
        yield
    finally:
        sys.path[:] = saved_path
        inside = model_dir.rstrip(os.sep) + os.sep
        for name in set(sys.modules) - loaded_before:  # the next config's files, not these
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(inside):
                del sys.modules[name]
        sys.modules.update(hidden)


def _imported_from(name: str, module: Any, folders: set) -> bool:
    """Whether ``module`` was found on ``sys.path`` in one of ``folders`` (a package's
    submodules go with it). Never this package, nor ``__main__``."""
    top = sys.modules.get(name.partition(".")[0], module)
    if name == "__main__" or top is sys.modules.get(__package__.partition(".")[0]):
        return False
    file = getattr(top, "__file__", None)
    if file:
        location = os.path.dirname(os.path.dirname(file) if hasattr(top, "__path__") else file)
        return os.path.realpath(location) in folders
    # A namespace package: found in each folder of its __path__.
    return any(os.path.realpath(os.path.dirname(part)) in folders for part in getattr(top, "__path__", None) or ())


SELF_TEST_NOT_RUN = "self-test NOT run"


def self_test(spec: ArchiveSpec, on_started: Optional[Callable[[Any, str], None]] = None) -> str:
    """Start the config's handler on the CPU as a worker would (its files as the archive holds
    them, imported as the worker imports them, its model config: the weights are loaded) and run
    its start-up self-test on the samples. Returns the self-test's summary (or why it did not
    run); raises ArchiveConfigError naming the failure in one line (the weights file, when they do
    not fit the model). ``on_started(handler, model_dir)`` runs once the self-test passed, before
    the handler is closed (:func:`time_batches`)."""
    missing = [p for p in (spec.serialized_file, *spec.extra_files, *(p for p, _ in spec.samples))
               if p is not None and not p.exists()]
    if missing:
        return f"{SELF_TEST_NOT_RUN}: {missing[0]} is not built yet (python -m handlers.archive builds it)"
    with staged_model_dir(spec) as staged:
        handler_class = load_handler_class(str(Path(staged) / spec.handler.name))
        if not hasattr(handler_class, "read_config"):
            return "not run: the handler is not a MicroBatchHandler"
        handler = handler_class()
        try:
            model_config = spec.model_config
            handler.start(model_dir=staged, section=model_config.get("handler"), device="cpu",
                          model_files=ModelFiles(model_file=spec.model_file.name if spec.model_file else None,
                                                 serialized_file=spec.serialized_file.name
                                                 if spec.serialized_file else None),
                          server_timeout_s=response_timeout(model_config), server_timeout_name="responseTimeout")
        except Exception as exc:  # noqa: BLE001 - a model that cannot start, in one line
            message = " ".join(str(exc).split())
            for path in (spec.handler, spec.model_file, spec.serialized_file, *spec.extra_files):
                if path is not None:  # the user's files by their own paths, not the staged copies'
                    message = message.replace(str(Path(staged) / path.name), str(path))
            if spec.serialized_file is not None and _raised_in(exc, "load_state_dict"):
                model = f" ({spec.model_file.name})" if spec.model_file else ""
                raise ArchiveConfigError(f"{spec.source}: serialized_file: {spec.serialized_file} does not fit the "
                                         f"model{model}: {message}") from None
            raise ArchiveConfigError(f"{spec.source}: the model cannot start: {message}") from None
        else:
            if on_started is not None:
                on_started(handler, staged)
        finally:
            handler.close()
        if not spec.samples:
            return f"{SELF_TEST_NOT_RUN}: no samples (samples: in the config); the model did start on the CPU"
        return handler.self_test.summary()


def time_batches(spec: ArchiveSpec) -> tuple:
    """Start the model as :func:`self_test` does and size TorchServe's queue from its
    ``handler.request_budget_s`` (:func:`handlers.packaging.queue_sizing.plan_queue`): batches of
    its largest sample request, repeated to each size the plan asks about, timed through ``respond``
    (preprocessing, model, postprocessing) and taken at their fastest
    (:func:`~handlers.packaging.queue_sizing.model_cost`). Returns ``(the self-test's summary,
    the QueuePlan)``; the plan is None without samples to time."""
    plans = []

    def on_started(handler, model_dir: str) -> None:
        from handlers.core.self_test import load_samples

        samples = load_samples(model_dir)
        if not samples:
            return

        # The largest sample, repeated: the budget must hold for the heaviest requests the samples show.
        heaviest = max(samples, key=lambda sample: _size_of(sample.request.body)).request

        def time_of(size: int) -> float:
            def batch() -> None:  # fresh requests each time: a request is answered once
                handler.respond([dataclasses.replace(heaviest) for _ in range(size)])

            return served_time(model_cost(batch), size)

        config = spec.model_config
        if serves_on_a_gpu(config):
            return  # the handler runs on the CPU here: its times would size a GPU's queue wrong
        plans.append(plan_queue(budget_of(config), config.get("batchSize", 1), time_of, config.get("minWorkers", 1)))

    summary = self_test(spec, on_started)
    return summary, plans[0] if plans else None


def _size_of(body: Any) -> int:
    return len(body) if isinstance(body, (bytes, bytearray, str)) else len(repr(body))


def serves_on_a_gpu(model_config: dict) -> bool:
    """Whether TorchServe will run the model on an accelerator: its ``deviceType``, else (as
    TorchServe does) whether this machine has CUDA."""
    device = str(model_config.get("deviceType", "")).lower()
    if device in ("gpu", "neuron"):
        return True
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def sized_for_budget(spec: ArchiveSpec, plan: Optional[QueuePlan]) -> tuple:
    """``(spec, lines)``: the spec with ``jobQueueSize`` and ``batchSize`` from ``plan`` written
    into its model config, and one line per thing to tell the user (``warning: ...`` for a
    warning). A ``jobQueueSize`` the config sets itself is kept; a warning says when it is longer
    than the budget allows or shorter than a round of batches. No budget: the spec as it is."""
    config, budget = spec.model_config, budget_of(spec.model_config)
    if budget <= 0:
        return spec, []
    if plan is None:
        if "jobQueueSize" in config:
            return spec, []
        why = ("TorchServe will run the model on a GPU and it is timed on the CPU here: set jobQueueSize (and "
               "batchSize) in the config" if serves_on_a_gpu(config) else "no samples to time the model with: add samples:")
        return spec, [f"warning: {spec.source}: {BUDGET_KEY} {budget:g} s, but jobQueueSize NOT written "
                      f"(config.properties' job_queue_size applies): {why}"]
    workers = config.get("minWorkers", 1)
    explicit = config.get("jobQueueSize")
    if explicit is not None:
        round_size = config.get("batchSize", 1) * workers
        wrong = [plan.note] if plan.note else []
        if explicit > plan.job_queue_size:
            wrong.append(f"its last requests would be answered after the budget ({BUDGET_KEY} {budget:g} s makes "
                         f"it {plan.job_queue_size} with batches of {plan.batch_size})")
        if explicit < round_size:
            wrong.append(f"shorter than a round of batches ({round_size}): partial batches under load")
        if wrong:
            return spec, [f"warning: {spec.source}: model_config.jobQueueSize {explicit}, kept as the config sets it: "
                          f"{'; '.join(wrong)}"]
        return spec, [f"{spec.model_name}: jobQueueSize {explicit} as the config sets it (within {BUDGET_KEY} "
                      f"{budget:g} s: at most {plan.job_queue_size})"]
    sized = {**config, "batchSize": plan.batch_size, "jobQueueSize": plan.job_queue_size}
    rounds = plan.job_queue_size // (plan.batch_size * workers)
    lines = [f"{spec.model_name}: jobQueueSize {plan.job_queue_size} ({rounds} round(s) of {plan.batch_size * workers}) "
             f"from {BUDGET_KEY} {budget:g} s, batches of {plan.batch_size} timed at {plan.batch_time_s:.2f} s"]
    if plan.note:
        lines.append(f"{spec.model_name}: {plan.note}")
    return dataclasses.replace(spec, model_config=sized), lines


def _raised_in(exc: BaseException, function: str) -> bool:
    """Whether ``exc`` was raised inside a function of that name (e.g. torch's load_state_dict)."""
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_name == function:
            return True
        frame = frame.tb_next
    return False


def build_artefacts(spec: ArchiveSpec, force: bool = False) -> bool:
    """Run the config's build command (in ``spec.root``) when an artefact is missing (or ``force``)."""
    wanted = [p for p in [spec.serialized_file, *spec.extra_files, *(p for p, _ in spec.samples)] if p is not None]
    if spec.build is None or (not force and all(p.exists() for p in wanted)):
        return False
    command = [sys.executable if arg == "python" else arg for arg in spec.build]
    subprocess.run(command, cwd=spec.root, check=True)
    missing = [str(p) for p in wanted if not p.exists()]
    if missing:
        raise ArchiveConfigError(f"{spec.source}: build: the command ran but did not make {', '.join(missing)}")
    return True


def archive(spec: ArchiveSpec, model_store: Path) -> Path:
    """Run ``torch-model-archiver`` for ``spec``; returns the path of the written ``.mar``."""
    model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"archive-{spec.model_name}-") as tmp:
        stage = Path(tmp) / "extra"
        stage.mkdir()
        # TorchServe's --handler is a generated entry module that loads the handler file beside
        # it: a handler file that cannot be loaded in the worker then leaves the one line too.
        entry = Path(tmp) / entry_file_name(spec.handler.name)
        entry.write_text(entry_source(spec.handler.name))
        _copy_into(spec.handler, stage)
        # --extra-files DIR flattens DIR into the archive root: stage a folder that holds handlers/.
        shutil.copytree(PACKAGE_DIR, stage / "handlers", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for extra in spec.extra_files:
            _copy_into(extra, stage)
        for name, content in sample_files(spec).items():
            (stage / name).parent.mkdir(exist_ok=True)
            (stage / name).write_bytes(content)
        config_file = Path(tmp) / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(spec.model_config, sort_keys=False))
        command = [
            _archiver(), "--model-name", spec.model_name, "--version", spec.version,
            "--handler", str(entry), "--extra-files", str(stage),
            "--config-file", str(config_file), "--export-path", str(model_store), "--force",
        ]
        if spec.serialized_file:
            command += ["--serialized-file", str(spec.serialized_file)]
        if spec.model_file:
            command += ["--model-file", str(spec.model_file)]
        # torch-model-archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps two
        # builds of the same model (two checkouts, a test session beside `make serve`) apart.
        subprocess.run(command, check=True, env={**os.environ, "TMPDIR": tmp})
    return model_store / f"{spec.model_name}.mar"


def _copy_into(path: Path, folder: Path) -> None:
    """``path`` (a file or a folder) into ``folder``, as ``--extra-files`` lays it out."""
    if path.is_dir():
        shutil.copytree(path, folder / path.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        shutil.copy2(path, folder / path.name)


def archive_config(path: Path, model_store: Path, model_config_updates: Optional[dict] = None,
                   root: Optional[Path] = None, size_queue: bool = False, **changes) -> Path:
    """Check one config, build its artefacts if missing, archive it into ``model_store``. For a
    variant of a shipped model, ``changes`` replace fields of the spec (e.g. ``model_name``,
    ``handler``) and ``model_config_updates`` are merged into its model config. Returns the
    path of the ``.mar``. ``size_queue``: ``jobQueueSize`` (and ``batchSize``) from the budget,
    as ``python -m handlers.archive`` writes them (the model is started and timed)."""
    spec = load_spec(path, root)
    build_artefacts(spec)
    if model_config_updates:
        spec = dataclasses.replace(spec, model_config={**spec.model_config, **model_config_updates})
    with tempfile.TemporaryDirectory(prefix="mbh-aot-") as aot_folder:
        spec, lines = with_aot_packages(spec, Path(aot_folder))
        print_lines(lines)
        if size_queue and budget_of(spec.model_config) > 0:
            spec, _ = sized_for_budget(spec, time_batches(spec)[1])
        if model_config_updates:  # over what sizing wrote, as given
            changes["model_config"] = {**spec.model_config, **model_config_updates}
        return archive(dataclasses.replace(spec, **changes), model_store)


def print_lines(lines: list, prefix: str = "") -> None:
    """The lines a step returns for the user: ``warning: ...`` on stderr as it is, the others on
    stdout after ``prefix``."""
    for line in lines:
        warning = line.startswith("warning: ")
        print(line if warning else f"{prefix}{line}", file=sys.stderr if warning else sys.stdout, flush=True)


def _archiver() -> str:
    beside_python = Path(sys.executable).parent / "torch-model-archiver"
    found = str(beside_python) if beside_python.exists() else shutil.which("torch-model-archiver")
    if not found:
        raise SystemExit("torch-model-archiver is not installed: pip install torch-model-archiver")
    return found


# -- AOTInductor packages (handler.compile.aot): built here, loaded by handlers.core.aot ----------

def aot_settings(spec: ArchiveSpec):
    """The config's compile settings when they ask for AOTInductor packages (``handler.compile.aot``,
    or TorchServe's ``pt2.export.aot_compile``), else None."""
    config = spec.model_config
    settings = read_compile((with_pt2(config.get("handler"), config.get("pt2")) or {}).get("compile"))
    return settings if settings is not None and settings.aot else None


def with_aot_packages(spec: ArchiveSpec, folder: Path) -> tuple:
    """``(spec, lines)``: for a config that asks for them, the packages built into ``folder/aot``,
    which joins the spec's extra files; lines to tell the user (``warning: ...`` when none could be
    built: its workers then compile at start-up). Other configs, and a spec that already carries
    an ``aot`` folder: as they are."""
    settings = aot_settings(spec)
    if settings is None or any(path.name == AOT_FOLDER for path in spec.extra_files):
        return spec, []
    config = spec.model_config
    not_built = f"warning: {spec.source}: handler.compile.aot: no AOTInductor packages in the archive"
    if serves_on_a_gpu(config):
        return spec, [f"{not_built}: they are built on this machine's CPU and TorchServe will run the model on a "
                      f"GPU (its workers compile at start-up)"]
    out, built, started = folder / AOT_FOLDER, [], time.monotonic()

    def on_started(handler, model_dir: str) -> None:
        from handlers.core.self_test import load_samples

        samples = load_samples(model_dir)
        if samples:
            built.extend(build_packages(handler, settings.sizes(handler.settings.micro_batch_size), samples, out))

    # Started eager (compile off): the packages are what is being built.
    eager = dataclasses.replace(spec, model_config={**config, "handler": {**(config.get("handler") or {}),
                                                                         "compile": {}}})
    try:
        self_test(eager, on_started)
    except ArchiveConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - export and AOTInductor raise many kinds: said in one line
        text = " ".join(str(exc).split())[:400]
        return spec, [f"{not_built}: compiling failed ({type(exc).__name__}: {text}); its workers compile at start-up"]
    if not built:
        return spec, [f"{not_built}: no samples to export the model at (add samples:); its workers compile at start-up"]
    mib = sum(path.stat().st_size for path in out.iterdir()) / 2**20
    line = (f"{spec.model_name}: AOTInductor packages for micro-batch sizes {', '.join(map(str, built))} "
            f"({mib:.1f} MiB) built in {time.monotonic() - started:.0f} s")
    return dataclasses.replace(spec, extra_files=[*spec.extra_files, out]), [line]
