"""Writing the run directory's logs: events stamped in one place, metrics one line per step."""

from __future__ import annotations

from typing import Any

from .events import Event, Stamp
from .jsonl import JsonlWriter, NullWriter


class EventLog:
    """Appends stamped events to events.jsonl (rank 0); other ranks hold a silent one."""

    def __init__(self, writer: JsonlWriter | NullWriter, stamp: Stamp):
        self.writer = writer
        self.stamp = stamp

    def emit(self, event: Event, **fields: Any) -> None:
        self.writer.write(self.stamp.record(event, **fields))

    def close(self) -> None:
        self.writer.close()
