"""``requirements.txt`` for a package that serves an archive in a fresh venv: what this package's
code needs on Ray Serve, and what the archive's own Python files import, each pinned to the version
installed here (the one the export was made and tested with; torch as a range up to it, since
its CPU and CUDA builds differ per machine). A module imported that is not installed here is
named in a comment: the export cannot know its distribution."""

from __future__ import annotations

import ast
import sys
from importlib import metadata
from typing import Mapping

# What handlers/ itself needs on Ray Serve, by distribution.
BASE = ("ray", "torch", "numpy", "pillow", "pyyaml")
EXTRAS = {"ray": "[serve]"}
TORCH_FLOOR = "2.1"  # pyproject.toml's
# Import names whose distribution has another name, where packages_distributions() may not say.
KNOWN = {"ts": "torchserve", "PIL": "pillow", "yaml": "pyyaml", "cv2": "opencv-python", "sklearn": "scikit-learn"}


def imported_modules(sources: Mapping[str, bytes]) -> set:
    """The top-level modules the Python files import (absolute imports), less the standard
    library and the archive's own modules and folders; files under ``handlers/`` are skipped
    (the package's own needs are :data:`BASE`)."""
    own = {name.split("/")[0].removesuffix(".py") for name in sources}
    found = set()
    for name, source in sources.items():
        if name.startswith("handlers/"):
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue  # the archive's own problem: its start-up says so
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in own and m != "handlers"}


def requirements_for(sources: Mapping[str, bytes]) -> str:
    """The text of ``requirements.txt`` for an archive whose Python files are ``sources``."""
    distributions = {name: dists[0] for name, dists in metadata.packages_distributions().items() if dists}
    wanted, unknown = list(BASE), []
    for module in sorted(imported_modules(sources)):
        dist = KNOWN.get(module) or distributions.get(module)
        if dist is None:
            unknown.append(module)
        elif dist.lower() not in (w.lower() for w in wanted):
            wanted.append(dist)
    lines = ["# Written by python -m handlers.export_ray: pip install -r code/requirements.txt"]
    for dist in wanted:
        lines.append(_pinned(dist.lower()))
    lines += [f"# {module}: imported by the archive, not installed where it was exported: add its distribution"
              for module in unknown]
    return "\n".join(lines) + "\n"


def _pinned(dist: str) -> str:
    try:
        version = metadata.version(dist).split("+")[0]
    except metadata.PackageNotFoundError:
        return dist + EXTRAS.get(dist, "")
    if dist == "torch":
        return f"torch>={TORCH_FLOOR},<={version}"
    return f"{dist}{EXTRAS.get(dist, '')}=={version}"
