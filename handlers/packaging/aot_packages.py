"""The archive's AOTInductor packages (``handler.compile.aot``): the model started on this
machine's CPU, eager, as the self-test starts it, and its ``infer`` compiled per bucket
(:func:`handlers.core.aot.build_packages`) into an ``aot/`` folder that the archive carries beside
the handler. Workers then load the packages instead of compiling (see ``handlers.core.aot``)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from handlers.core.aot import AOT_FOLDER, build_packages
from handlers.core.compiled import read_compile, with_pt2
from handlers.packaging.archive import ArchiveConfigError, ArchiveSpec, serves_on_a_gpu, self_test


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
