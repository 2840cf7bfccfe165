"""Where every benchmark puts what it measured: the table on stdout, and with ``--out`` the
table (``NAME.md``) and the raw numbers (``NAME.json``) in that folder."""

import json
from pathlib import Path
from typing import Optional


def publish(out: Optional[Path], name: str, data, table: str) -> None:
    print(table)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(as_json(data))
        (out / f"{name}.md").write_text(table + "\n")


def as_json(data) -> str:
    """A list as one row per line (a row's per-round timings stay on its line), else indented."""
    if isinstance(data, list):
        return "[\n" + ",\n".join(json.dumps(row) for row in data) + "\n]\n"
    return json.dumps(data, indent=1) + "\n"
