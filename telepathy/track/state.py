"""RUN_DIR/track/state.json: each tracker's run id and how far it got, kept across allocations:
`hwm` (the last step sent), `eval_hwm` (every evaluation up to this step was sent), `events`
(the lines of events.jsonl given).

Written atomically after every flush. Only ever a lower bound of what a tracker holds (a process
killed between a tracker's write and this file's): the relay asks the tracker itself where a
gap could hide (TensorBoard: purged from there; W&B and MLflow: read back)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.fsutil import write_json_atomic


def path_of(run_dir: Path) -> Path:
    return run_dir / "track" / "state.json"


def load(run_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path_of(run_dir).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save(run_dir: Path, state: dict[str, dict[str, Any]]) -> None:
    path = path_of(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, state)
