"""Print the project's dependencies (and those of the extras named) from pyproject.toml, one per
line, so that a venv gets them without installing this project itself: the integration tests
then prove that every .mar carries the handlers package it needs.

Usage: python scripts/deps.py serve test
"""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
