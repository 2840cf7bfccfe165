"""The package's layout and its import graph, from the source alone (nothing is imported):

    python -m scripts.import_graph          # the folder listing, then the summary
    python -m scripts.import_graph --edges  # and every import between parts

Parts, lowest first: ``engine`` (torch-free batch engine), ``core`` (the handler core),
``ready_made`` and ``packaging`` (side by side: neither imports the other), ``servers`` (one
adapter per server), then the top (``handlers/__init__.py``, the test kit and the commands). An
import may point down or within its part; an arrow upward, or between the two side-by-side
parts, is a layering error. Imports inside a function (deferred) are counted apart: upward ones
are allowed only where :data:`DEFERRED_UPWARD` gives the reason. tests/unit/test_architecture.py
holds the package to this.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "handlers"
LAYERS = {"engine": 0, "core": 1, "ready_made": 2, "packaging": 2, "servers": 3, "top": 4}
# Deferred imports that point upward, each with why it is not a dependency of the importer.
DEFERRED_UPWARD = {
    ("handlers.core.handler", "handlers.servers.torchserve"):
        "TorchServe calls initialize/handle on the handler object by name; the methods hand over "
        "to the adapter, imported only when TorchServe (or the test kit's fake context) calls them",
    ("handlers.packaging.torchserve_entry", "handlers.servers.torchserve"):
        "the class TorchServe serves for a handler file that cannot be loaded answers 503 with the "
        "reason through the adapter, imported only when TorchServe calls its initialize/handle",
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    deferred: bool  # inside a function: runs when called, not when the importer is imported
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    """Every module of the package: name → path."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def part_of(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) >= 2 and pieces[1] in LAYERS else "top"


def imports_of(name: str, path: Path, known: dict) -> list:
    """The package modules ``name`` imports (``from handlers.x import y`` counts as handlers.x.y
    when y is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []

    def visit(node, deferred: bool):
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in child.names]
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.append(Import(name, target, deferred, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return found


def graph() -> list:
    known = modules()
    return [edge for name, path in known.items() for edge in imports_of(name, path, known)]


def is_upward(edge: Import) -> bool:
    """Up a layer, or across between two parts on the same layer."""
    source, target = part_of(edge.importer), part_of(edge.imported)
    return LAYERS[target] > LAYERS[source] or (source != target and LAYERS[target] == LAYERS[source] != LAYERS["top"])


def cycles(edges: list) -> list:
    """Groups of modules that import each other, directly or around a loop (deferred imports
    included): Tarjan's strongly connected components of more than one module."""
    successors: dict = {}
    for edge in edges:
        successors.setdefault(edge.importer, set()).add(edge.imported)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(successors.get(node, ())):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(successors):
        if node not in index:
            connect(node)
    return found


def listing() -> str:
    """The package's folders and modules (with line counts), files first, then each folder."""
    lines = ["handlers/"]

    def walk(folder: Path, depth: int):
        entries = [p for p in folder.iterdir() if p.name != "__pycache__" and p.suffix != ".pyc"]
        for path in sorted((p for p in entries if p.is_file()), key=lambda p: p.name):
            lines.append(f"{'    ' * depth}{path.name:<28}{len(path.read_text().splitlines()):>5}")
        for path in sorted((p for p in entries if p.is_dir()), key=lambda p: p.name):
            lines.append(f"{'    ' * depth}{path.name}/")
            walk(path, depth + 1)

    walk(PACKAGE, 1)
    return "\n".join(lines)


def violations(edges: list) -> tuple:
    """What breaks the layering: module-level arrows upward, deferred ones upward that
    :data:`DEFERRED_UPWARD` does not explain, and cycles."""
    upward = [e for e in edges if not e.deferred and is_upward(e)]
    unexplained = [e for e in edges if e.deferred and is_upward(e) and (e.importer, e.imported) not in DEFERRED_UPWARD]
    return upward, unexplained, cycles(edges)


def summary(edges: list) -> str:
    deferred = [e for e in edges if e.deferred]
    deferred_upward = [e for e in deferred if is_upward(e)]
    upward, unexplained, loops = violations(edges)
    lines = [
        f"modules: {len(modules())}; imports between them: {len(edges) - len(deferred)} at module level, "
        f"{len(deferred)} deferred",
        f"cycles: {len(loops)}",
        f"arrows upward: {len(upward)}",
        f"deferred arrows upward: {len(deferred_upward)}, unexplained: {len(unexplained)}",
    ]
    lines += [f"  upward: {e.importer} -> {e.imported} (line {e.line})" for e in upward + unexplained]
    lines += [f"  cycle: {' -> '.join(group)}" for group in loops]
    lines += [f"  deferred, allowed: {a} -> {b}: {why}" for (a, b), why in DEFERRED_UPWARD.items()
              if any((e.importer, e.imported) == (a, b) for e in deferred_upward)]
    return "\n".join(lines)


def part_edges(edges: list) -> str:
    """Imports between parts, counted: importer part -> imported part."""
    counted: dict = {}
    for edge in edges:
        key = (part_of(edge.importer), part_of(edge.imported), edge.deferred)
        if key[0] != key[1]:
            counted[key] = counted.get(key, 0) + 1
    return "\n".join(f"{a:>10} -> {b:<10} {n:>3}{' (deferred)' if d else ''}"
                     for (a, b, d), n in sorted(counted.items(), key=lambda item: (-LAYERS[item[0][0]], item[0])))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", action="store_true", help="also print the imports between parts")
    args = parser.parse_args(argv)
    edges = graph()
    print(listing())
    print()
    if args.edges:
        print(part_edges(edges))
        print()
    print(summary(edges))
    return 1 if any(violations(edges)) else 0


if __name__ == "__main__":
    sys.exit(main())
