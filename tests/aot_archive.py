"""The quickstart model's AOTInductor variant that the tests share (tests/conftest.py ``aot_mar``)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "archiver_configs" / "quickstart.yaml"
NAME = "quickstart_aot"
# Micro-batch sizes the archive carries packages for.
BUCKETS = [2, 4]


def handler_section() -> dict:
    """quickstart's handler section with AOTInductor packages at :data:`BUCKETS`. One torch thread,
    set by the worker itself: packages are generated for a thread count (load_packages); a worker
    in a test process would otherwise run the count an earlier test left, and a Ray replica's
    follows the CPUs Ray gives it. No audit: the tests compare answers and count model calls."""
    section = yaml.safe_load(CONFIG.read_text())["model_config"]["handler"]
    return {**section, "audit_share": 0.0, "torch_threads": 1, "compile": {"aot": True, "buckets": BUCKETS}}


def build(model_store: Path) -> Path:
    """The archive, built by the archive tool into ``model_store``; returns its path."""
    from handlers.packaging.archive import archive_config

    return archive_config(CONFIG, model_store, {"handler": handler_section()}, model_name=NAME)
