"""Append-only JSON-lines files (metrics, events) and a reader that tolerates a torn last line."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .events import is_eval_row, is_train_row


class JsonlWriter:
    """Appends one JSON object per line, flushed at once so a tail on another node sees it.
    Threads may share one (the mirror's uploader emits events beside the training loop): a line
    is written whole under a lock."""

    def __init__(self, path: Path, fsync: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fsync = fsync
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class NullWriter:
    """Stands in for a JsonlWriter on ranks that do not write."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield each complete record; a partly written or garbled line is skipped."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


def last_per_step(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The training line of each step of metrics.jsonl (evaluation lines left out). The file is
    append-only: a step re-run after a fallback is logged again; the last line wins."""
    return {int(r["step"]): r for r in records if is_train_row(r)}


def evals_per_step(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The evaluation line of each evaluated step of metrics.jsonl; as for training lines, a
    step evaluated again (after a crash, or a resume that stopped its evaluation) is logged
    again and the last line wins."""
    return {int(r["step"]): r for r in records if is_eval_row(r)}


def wait_for_step(path: Path, step: int, timeout_s: float, alive=lambda: True) -> int:
    """Poll a metrics file until it records the training of `step` (or later); return the
    newest step trained."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = [r["step"] for r in read_jsonl(path) if is_train_row(r)]
        if steps and max(steps) >= step:
            return max(steps)
        if not alive():
            raise RuntimeError(f"the run writing {path} ended before step {step}")
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not reach step {step} within {timeout_s} s")
