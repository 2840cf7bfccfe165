"""``python -m handlers.archive``: build self-contained ``.mar`` archives from
``archiver_configs/*.yaml`` with the real ``torch-model-archiver``.

Usage::

    python -m handlers.archive                      # every config in ./archiver_configs/
    python -m handlers.archive my_model.yaml --model-store model_store
    python -m handlers.archive --check              # check the configs and self-test the models

The work is done in :mod:`handlers.packaging.archive`; this module is the command (and keeps
``from handlers.archive import load_spec, archive_config`` working).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from handlers.packaging.archive import (ArchiveConfigError, ArchiveSpec, archive, archive_config, aot_settings,
                                        build_artefacts, ineffective_settings, load_spec, print_lines, self_test,
                                        sized_for_budget, time_batches, with_aot_packages, SELF_TEST_NOT_RUN)
from handlers.packaging.queue_sizing import budget_of

__all__ = ["ArchiveConfigError", "ArchiveSpec", "archive", "archive_config", "load_spec", "main"]


def _print_errors(exc: ArchiveConfigError) -> None:
    for line in str(exc).splitlines():
        print(f"error: {line}", file=sys.stderr, flush=True)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers.archive", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", type=Path, help="config files (default: ./archiver_configs/*.yaml)")
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--root", type=Path, default=None,
                        help="where every config's paths start (default: each config's root: key, else its folder)")
    parser.add_argument("--rebuild", action="store_true", help="run build commands even if artefacts exist")
    parser.add_argument("--check", action="store_true",
                        help="only check the configs and run each model's self-test on its samples; exits 3 when a "
                             "self-test could not run (files not built yet, no samples)")
    parser.add_argument("--configs-only", action="store_true",
                        help="with --check: check the configs without starting the models (no self-test)")
    args = parser.parse_args(argv)
    default_folder = (args.root or Path(".")) / "archiver_configs"
    configs = args.configs or sorted(default_folder.glob("*.yaml"))
    if not configs:
        parser.error(f"no configs given and none in {default_folder}")
    specs, failed = [], False
    for path in configs:  # every config's every error, in one run
        try:
            specs.append(load_spec(path, args.root))
        except ArchiveConfigError as exc:
            _print_errors(exc)
            failed = True
    if failed:
        return 2
    for spec in specs:
        for note in ineffective_settings(spec):
            print(f"warning: {spec.source}: {note}", file=sys.stderr)
    if args.check:
        from handlers.core.self_test import summary_not_logged

        not_run = []
        for spec in specs:
            if args.configs_only:
                continue
            try:
                budgeted = budget_of(spec.model_config) > 0
                with summary_not_logged():  # printed below, once
                    summary, plan = time_batches(spec) if budgeted else (self_test(spec), None)
            except ArchiveConfigError as exc:
                _print_errors(exc)
                failed = True
                continue
            print(f"{spec.model_name}: {summary}", flush=True)
            print_lines(sized_for_budget(spec, plan)[1] if budgeted else [], "the archive would hold: ")
            if summary.startswith(SELF_TEST_NOT_RUN):
                not_run.append(spec.model_name)
        if failed:
            return 2
        names = ", ".join(s.model_name for s in specs)
        if not_run:  # a green check must mean the models were started and tested
            print(f"{len(specs)} config(s) valid, but the self-test did NOT run for {', '.join(not_run)} (see above)")
            return 3
        print(f"{len(specs)} config(s) OK{' (configs only, no self-test)' if args.configs_only else ''}: {names}")
        return 0
    aot_folder = Path(tempfile.mkdtemp(prefix="mbh-aot-"))  # the packages, until archived
    try:
        return _archive_all(specs, args, aot_folder)
    finally:
        shutil.rmtree(aot_folder, ignore_errors=True)


def _archive_all(specs: list, args, aot_folder: Path) -> int:
    for number, spec in enumerate(specs, 1):
        started = time.monotonic()
        prefix = f"[{number}/{len(specs)}] {spec.model_name}"
        print(f"{prefix}: checking artefacts", flush=True)
        try:
            if build_artefacts(spec, args.rebuild):
                print(f"{prefix}: built artefacts with {' '.join(spec.build)}", flush=True)
            if aot_settings(spec) is not None:  # before timing: the batches are timed as the packages run them
                print(f"{prefix}: compiling AOTInductor packages (handler.compile.aot)", flush=True)
            spec, lines = with_aot_packages(spec, aot_folder / spec.model_name)
            print_lines(lines, f"{prefix}: ")
            if budget_of(spec.model_config) > 0:  # the queue from the budget: the model is started and timed
                print(f"{prefix}: timing the model's batches for its queue", flush=True)
                spec, lines = sized_for_budget(spec, time_batches(spec)[1])
                print_lines(lines, f"{prefix}: ")
            print(f"{prefix}: archiving with torch-model-archiver", flush=True)
            written = archive(spec, args.model_store)
        except (ArchiveConfigError, subprocess.CalledProcessError) as exc:
            print(f"error: {prefix}: {exc}", file=sys.stderr)
            return 1
        size_kib = written.stat().st_size / 1024
        print(f"{prefix}: wrote {written} ({size_kib:,.0f} KiB) in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
