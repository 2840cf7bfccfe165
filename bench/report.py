"""Where every benchmark puts what it measured: the table on stdout, and with ``--out`` the
table (``NAME.md``) and the raw numbers (``NAME.json``) in that folder."""

import json
from pathlib import Path
from typing import Optional


def publish(out: Optional[Path], name: str, data, table: str) -> None:
    print(table)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(data, indent=1))
        (out / f"{name}.md").write_text(table + "\n")
