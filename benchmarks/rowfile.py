"""Benchmark result files, {"rows": [...]}: a re-run replaces the rows it measured again."""

from __future__ import annotations

import json
from pathlib import Path


def merge_rows(path: Path, rows: list[dict], key: tuple[str, ...]) -> None:
    """Write ``rows`` to ``path``, dropping the earlier rows with the same values of ``key``."""
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    new = {tuple(r[k] for k in key) for r in rows}
    kept = [r for r in old if tuple(r[k] for k in key) not in new]
    path.write_text(json.dumps({"rows": kept + rows}, indent=1) + "\n")
