"""Benchmarks: each prints its report as JSON (and a table on stderr); `--out` keeps it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], out: str | None) -> None:
    """Print the report as JSON on stdout and, with `out`, write it there too."""
    print(json.dumps(report, indent=1))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1) + "\n")
