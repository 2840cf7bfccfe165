"""The code blocks of README.md and docs/*.md, each with the marker that says who runs it.

A block is preceded by ``<!-- run: NAME ... -->`` (a test runs every block of that name, in
order, as one script) or ``<!-- not run: WHY -->``. ``#>`` lines in a shell block are the output
the commands before them print; a Python or YAML block whose first line is ``# FILE`` is that
file, written as it stands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/*.md")
MARKER = re.compile(r"^<!--\s*(run|not run):\s*(.*?)\s*-->$")
FILE_LINE = re.compile(r"^# ([\w./-]+\.\w+)$")


@dataclass(frozen=True)
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    marker: Optional[str]  # "run" or "not run", None when missing
    label: str  # the run name, or the reason it is not run

    @property
    def file_name(self) -> Optional[str]:
        """The file a block stands for (its first line ``# FILE``), if any."""
        first = self.text.splitlines()[0] if self.text else ""
        found = FILE_LINE.match(first) if self.language in ("python", "yaml") else None
        return found.group(1) if found else None

    @property
    def expected_output(self) -> list:
        return [line[3:] for line in self.text.splitlines() if line.startswith("#> ")]

    def where(self) -> str:
        return f"{self.document}:{self.line}"


def documents() -> list:
    return sorted({p for pattern in DOCUMENTS for p in ROOT.glob(pattern)})


def blocks_of(path: Path) -> list:
    lines = path.read_text().splitlines()
    found, number = [], 0
    while number < len(lines):
        line = lines[number]
        if line.startswith("```"):
            language = line[3:].strip()
            end = next(k for k in range(number + 1, len(lines)) if lines[k].startswith("```"))
            before = next((lines[k].strip() for k in range(number - 1, -1, -1) if lines[k].strip()), "")
            marker = MARKER.match(before)
            kind, label = (marker.group(1), marker.group(2)) if marker else (None, "")
            if kind == "run":
                label = label.split()[0]
            found.append(Block(str(path.relative_to(ROOT)), number + 1, language, "\n".join(lines[number + 1:end]) + "\n",
                               kind, label))
            number = end
        number += 1
    return found


def all_blocks() -> list:
    return [block for path in documents() for block in blocks_of(path)]


def blocks_named(name: str) -> list:
    return [block for block in all_blocks() if block.marker == "run" and block.label == name]


def script_of(blocks: list) -> str:
    """The shell script a user pastes: shell blocks as they are, file blocks written with a
    heredoc (what pasting them into an editor does)."""
    parts = []
    for block in blocks:
        if block.file_name:
            parts.append(f"cat > {block.file_name} <<'DOC_BLOCK_END'\n{block.text}DOC_BLOCK_END\n")
        else:
            parts.append(f"# --- {block.where()}\n{block.text}")
    return "".join(parts)


# Who runs each kind of block.
RUNNERS = {
    "walkthrough": "tests/integration/test_docs.py::test_the_readme_walkthrough_runs_as_written",
    "make-serve": "tests/integration/test_docs.py::test_make_serve_and_the_commands_it_prints",
    "with-make-serve": "tests/integration/test_docs.py::test_make_serve_and_the_commands_it_prints",
    "ray-serve": "tests/integration/test_docs.py::test_the_ray_serve_commands_run_as_written",
    "config-check": "tests/unit/test_docs_blocks.py::test_every_config_block_passes_the_check",
}


def outputs_in_order(expected: list, output: str) -> Optional[str]:
    """None when every expected line appears in ``output`` in order (whitespace aside: TorchServe
    indents JSON answers that the docs show on one line), else the first one missing."""
    squeezed = "".join(output.split())
    position = 0
    for line in expected:
        found = squeezed.find("".join(line.split()), position)
        if found < 0:
            return line
        position = found + len("".join(line.split()))
    return None
