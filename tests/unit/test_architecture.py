"""The package's layout holds: its parts import downward only (engine, core, ready-made and
packaging, servers, then the top), no module imports itself around a loop, and the 0.12 module
paths still import, with a warning, as the modules they became (scripts/import_graph.py)."""

import subprocess
import sys
import warnings

import pytest

from scripts import import_graph
from scripts.import_graph import DEFERRED_UPWARD, Import, cycles, graph, is_upward, part_of, violations


def test_no_cycles_and_no_arrow_upward():
    edges = graph()
    assert len(edges) > 100  # the graph was read: the package's modules import each other
    assert violations(edges) == ([], [], [])
    deferred_upward = {(e.importer, e.imported) for e in edges if e.deferred and is_upward(e)}
    assert deferred_upward <= set(DEFERRED_UPWARD)


def test_the_checks_can_fail():
    """The rules catch what they are for, on made-up edges."""
    up = Import("handlers.engine.pool", "handlers.core.request", deferred=False, line=1)
    across = Import("handlers.ready_made.text", "handlers.packaging.archive", deferred=False, line=1)
    down = Import("handlers.servers.torchserve", "handlers.core.request", deferred=False, line=1)
    assert is_upward(up) and is_upward(across) and not is_upward(down)
    unexplained = Import("handlers.engine.pool", "handlers.servers.ray_serve", deferred=True, line=1)
    assert violations([up, down, unexplained]) == ([up], [unexplained], [])
    loop = [Import("handlers.core.a", "handlers.core.b", True, 1),
            Import("handlers.core.b", "handlers.core.a", False, 1)]
    assert cycles(loop) == [["handlers.core.a", "handlers.core.b"]]
    assert part_of("handlers.testing") == "top" and part_of("handlers.engine") == "engine"


def test_every_module_is_in_a_part_and_the_parts_are_folders():
    names = import_graph.modules()
    inside = {name for name in names if part_of(name) != "top"}
    top = set(names) - inside
    assert top == {"handlers", "handlers._old_paths", "handlers.archive", "handlers.export_ray", "handlers.ray_serve",
                   "handlers.testing", "handlers.torchserve_config"}
    assert {part_of(name) for name in inside} == {"engine", "core", "ready_made", "packaging", "servers"}


def test_the_command_prints_the_listing_and_the_summary():
    result = subprocess.run([sys.executable, "-m", "scripts.import_graph"], capture_output=True, text=True,
                            timeout=60, cwd=import_graph.PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "    engine/\n" in result.stdout and "cycles: 0\n" in result.stdout
    assert "arrows upward: 0\n" in result.stdout


@pytest.mark.parametrize("old, new", [("handlers._engine", "handlers.engine.batch_engine"),
                                      ("handlers._rayserve", "handlers.servers.ray_serve"),
                                      ("handlers._text", "handlers.ready_made.text_input")])
def test_old_module_paths_import_with_a_warning_as_the_same_module(old, new):
    import importlib

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the alias left the module's own spec alone
    assert any(issubclass(w.category, DeprecationWarning) and f"{old} moved to {new}" in str(w.message)
               for w in caught)


def test_the_architecture_page_names_every_module():
    page = (import_graph.PACKAGE.parent / "docs" / "architecture.md").read_text()
    listing = page.split("```", 2)[1]
    for path in import_graph.PACKAGE.rglob("*"):
        if "__pycache__" in path.parts or path.name == "__init__.py" and path.parent != import_graph.PACKAGE:
            continue
        assert path.name + ("/" if path.is_dir() else "") in listing, path
