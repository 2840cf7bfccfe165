"""The compiled path: the handler's ``infer`` compiled with ``torch.compile`` at a few fixed
micro-batch sizes (buckets), warmed and checked against eager at start-up.

A graph compiled with ``dynamic=False`` (and a CUDA graph, mode ``reduce-overhead``) serves one
shape. So each bucket is compiled once, at start-up, on the samples (copies of them up to the
bucket's size), and its answers are compared with eager's at the self-test's tolerance. Served,
the model runs in dynamo's run-only mode: a shape compiled at start-up takes its compiled code,
any other shape (a size between buckets, a text of another length) runs eager, and nothing is
ever compiled while requests wait. When compiling fails or an answer differs, one line says so
and the worker runs eager.

Settings (``handler.compile``; an empty mapping, the default, leaves it off)::

    compile:
      mode: default      # torch.compile's mode: default, reduce-overhead (CUDA graphs on a GPU),
                         # max-autotune, max-autotune-no-cudagraphs
      backend: inductor  # torch.compile's backend
      buckets: auto      # sizes to compile at: a list, or auto (powers of two from 4 up to
                         # micro_batch_size, or to 16)
      cache_dir: ""      # inductor's cache (TORCHINDUCTOR_CACHE_DIR), shared by the model's
                         # workers and restarts (default: compile_cache/ in the model's folder;
                         # relative paths start there)
      min_fill: 0.5      # a short micro-batch is padded to a bucket only when it fills at
                         # least this share of it (and only when batch invariance is proven)
      aot: false         # AOTInductor: python -m handlers.archive compiles each bucket ahead of
                         # time into the archive (handlers.core.aot); workers load, not compile
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from handlers.engine.settings import ConfigError

log = logging.getLogger(__name__)

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
KEYS = ("enabled", "mode", "backend", "buckets", "cache_dir", "min_fill", "aot")
AUTO_LARGEST = 16
CACHE_FOLDER = "compile_cache"
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


@dataclass(frozen=True)
class CompileSettings:
    """``handler.compile``, checked."""

    mode: str = "default"
    backend: str = "inductor"
    buckets: Any = "auto"
    cache_dir: str = ""
    min_fill: float = 0.5
    aot: bool = False

    def sizes(self, micro_batch_size: Optional[int]) -> tuple:
        """The buckets: the configured list, or auto's powers of two from 4 up to
        ``micro_batch_size`` (which is one of them), or up to 16. Size 1 is left out of auto: a
        lone image ran 0.78x eager compiled (ResNet-18, 2 CPU cores)."""
        if self.buckets != "auto":
            return tuple(sorted(set(self.buckets)))
        largest = micro_batch_size or AUTO_LARGEST
        sizes, size = [], 4
        while size < largest:
            sizes.append(size)
            size *= 2
        return tuple(sorted({*sizes, largest}))


def read_compile(section: Any) -> Optional[CompileSettings]:
    """``handler.compile`` as :class:`CompileSettings`; None when it is off (empty, or
    ``enabled: false``). Raises ConfigError naming the key, the rule and the value."""
    if not section:
        return None
    unknown = sorted(set(section) - set(KEYS))
    if unknown:
        raise ConfigError(f"handler.compile.{unknown[0]} is not a known setting; known settings: {', '.join(KEYS)}")
    enabled = section.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"handler.compile.enabled must be true or false, got {enabled!r}")
    if not enabled:
        return None
    settings = CompileSettings(**{key: value for key, value in section.items() if key != "enabled"})
    if settings.mode not in MODES:
        raise ConfigError(f"handler.compile.mode must be one of {', '.join(MODES)}, got {settings.mode!r}")
    if not isinstance(settings.backend, str) or not settings.backend:
        raise ConfigError(f"handler.compile.backend must be a torch.compile backend's name, got {settings.backend!r}")
    buckets = settings.buckets
    if buckets != "auto" and not (isinstance(buckets, list) and buckets and all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in buckets)):
        raise ConfigError(f"handler.compile.buckets must be 'auto' or a list of micro-batch sizes >= 1, "
                          f"got {buckets!r}")
    if not isinstance(settings.cache_dir, str):
        raise ConfigError(f"handler.compile.cache_dir must be a folder's path, got {settings.cache_dir!r}")
    fill = settings.min_fill
    if not isinstance(fill, (int, float)) or isinstance(fill, bool) or not 0 < fill <= 1:
        raise ConfigError(f"handler.compile.min_fill must be a number in (0, 1], got {fill!r}")
    if not isinstance(settings.aot, bool):
        raise ConfigError(f"handler.compile.aot must be true or false, got {settings.aot!r}")
    return settings


def with_pt2(section: Any, pt2: Any) -> Any:
    """The ``handler:`` section with TorchServe's ``pt2:`` model-config section read as its
    ``compile`` (``pt2: {compile: {enable: true, backend, mode}}``, or the older ``pt2: {backend,
    mode}``), unless the section has a ``compile`` of its own; ``pt2: {export: {aot_compile: true}}``
    as ``compile: {aot: true}`` (AOTInductor packages per bucket, built by the archive tool)."""
    if not isinstance(pt2, Mapping) or isinstance(section, Mapping) and "compile" in section:
        return section
    export = pt2.get("export")
    if isinstance(export, Mapping) and export.get("aot_compile") is True:
        log.info("pt2.export.aot_compile: read as handler.compile {aot: true}")
        return {**(section or {}), "compile": {"enabled": True, "aot": True}}
    if "compile" in pt2:
        source = pt2["compile"]
        if not isinstance(source, Mapping) or source.get("enable") is not True:
            return section
    elif "backend" in pt2:
        source = pt2
    else:
        return section
    compiled = {"enabled": True, **{key: source[key] for key in ("backend", "mode") if key in source}}
    log.info("pt2: read as handler.compile %s", compiled)
    return {**(section or {}), "compile": compiled}


def cache_folder(settings: CompileSettings, model_dir: str) -> str:
    """Inductor's cache folder: ``cache_dir`` (relative to the model's folder), else
    ``compile_cache/`` in it, shared by every worker of the model and by its restarts; a
    temporary folder of the user's when the model's folder cannot be written."""
    folder = os.path.join(model_dir, settings.cache_dir or CACHE_FOLDER)
    try:
        os.makedirs(folder, exist_ok=True)
        if os.access(folder, os.W_OK):
            return os.path.abspath(folder)
    except OSError:
        pass
    return os.path.join(tempfile.gettempdir(), f"microbatch-handlers-{os.getuid()}", CACHE_FOLDER)


@dataclass
class Compiled:
    """What start-up compiled: the buckets and the run-only ``infer`` that serves them."""

    sizes: tuple
    infer: Any
    settings: CompileSettings
    cudagraphs: bool  # reduce-overhead on a GPU: each call starts a new CUDA-graph step
    seconds: float
    source: str = "torch.compile"  # or "aot": the archive's AOTInductor packages


def compile_buckets(handler, settings: CompileSettings, samples: list) -> Optional[Compiled]:
    """Compile ``handler.infer`` at each bucket (or, with ``aot``, load the archive's AOTInductor
    packages), warmed on copies of the samples' items, and check its answers against eager's;
    None (and one line in the log) when there are no samples, compiling or loading fails, or an
    answer differs beyond the self-test's tolerance."""
    if not samples:
        log.warning("handler.compile: no samples to warm and check the compiled model on: this worker runs eager "
                    "(ship samples: in the archiver config)")
        return None
    started = time.perf_counter()
    try:
        built = _aot_packages(handler) if settings.aot else None
        if built is None:
            built = _compile(handler, settings, settings.sizes(handler.settings.micro_batch_size))
        difference = _differs_from_eager(handler, samples, built)
    except Exception as exc:  # noqa: BLE001 - any failure to compile or load means eager, said once
        from handlers.core.aot import AotUnusable

        if isinstance(exc, AotUnusable):
            log.warning("handler.compile.aot: %s; this worker runs eager", exc)
        else:
            log.warning("handler.compile: compiling %s (backend %s, mode %s) failed: %s; this worker runs eager",
                        type(handler).__name__, settings.backend, settings.mode, _describe(exc))
        return None
    if difference:
        log.warning("handler.compile: %s; this worker runs eager", difference)
        return None
    seconds = time.perf_counter() - started
    log.info("handler.compile: %s %s at micro-batch sizes %s, checked against eager, in %.1f s", type(handler).__name__,
             built.how, ", ".join(map(str, built.sizes)), seconds)
    return Compiled(built.sizes, built.serve, settings, built.cudagraphs, seconds, built.source)


@dataclass
class _Built:
    sizes: tuple
    check: Any  # the infer the start-up check warms and compares (compiling on its first call)
    serve: Any  # the infer requests get: never compiles
    cudagraphs: bool
    how: str  # for the log line
    source: str = "torch.compile"


def _aot_packages(handler) -> Optional[_Built]:
    """The archive's AOTInductor packages, or None when it holds none (then compiled here)."""
    from handlers.core.aot import load_packages

    loaded = load_packages(handler)
    if loaded is None:
        log.warning("handler.compile.aot: the model's folder holds no AOTInductor packages (python -m handlers.archive "
                    "builds them into the .mar): compiling at start-up instead")
        return None
    return _Built(loaded.sizes, loaded.strict, loaded, False, f"loaded AOTInductor packages ({loaded.built_with})",
                  "aot")


def _compile(handler, settings: CompileSettings, sizes: tuple) -> _Built:
    import torch
    import torch._dynamo

    # Always ours (torch itself sets the variable once inductor has run): handler.compile.cache_dir
    # names another folder.
    os.environ[CACHE_ENV] = cache_folder(settings, handler.model_dir)
    # Every bucket (and a second memory layout of one) is an entry of infer's code: room for them.
    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit_name, max(getattr(config, limit_name), 2 * len(sizes) + 2))
    mode = None if settings.mode == "default" else settings.mode
    compiled = torch.compile(handler.infer, backend=settings.backend, mode=mode, dynamic=False)
    cudagraphs = handler.device.type == "cuda" and settings.mode == "reduce-overhead"
    # Served in run-only mode: the shapes compiled by the check, eager for any other; never a compile.
    return _Built(sizes, compiled, torch._dynamo.run(compiled), cudagraphs,
                  f"compiled (backend {settings.backend}, mode {settings.mode}; inductor's cache: "
                  f"{os.environ.get(CACHE_ENV, '-')})")


def _differs_from_eager(handler, samples: list, built: _Built) -> Optional[str]:
    """Run ``built.check`` at each of its sizes on copies of the samples' items (compiling it
    there, for torch.compile) and compare its answers, as clients get them, with eager's at the
    self-test's tolerance: the first difference, or None."""
    from handlers.core.self_test import _answer, first_difference, tolerance

    items = [handler._preprocess_request(sample.request) for sample in samples]
    rtol, atol = tolerance(handler)
    for size in built.sizes:
        batch = [items[i % len(items)] for i in range(size)]
        eager = handler._split_on_host(handler._forward(batch), size)
        for _ in range(3 if built.cudagraphs else 1):  # CUDA graphs record on the third call
            output = handler._forward(batch, infer=built.check, new_graph_step=built.cudagraphs)
        parts = handler._split_on_host(output, size)
        for slot, (alone, part) in enumerate(zip(eager, parts)):
            sample = samples[slot % len(samples)]
            item = batch[slot]
            difference = first_difference(_answer(handler, sample, alone, item), _answer(handler, sample, part, item),
                                          rtol, atol, "answer")
            if difference:
                return (f"the compiled model's answer to sample {sample.name} at micro-batch size {size} differs from "
                        f"eager's: {difference.replace(' alone ', ' eager ').replace(' together', ' compiled')} "
                        f"(tolerance rtol {rtol:g}, atol {atol:g})")
    return None


def _describe(exc: BaseException) -> str:
    """The innermost cause (dynamo wraps a backend's error in its own), as ``Type: first line``."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
