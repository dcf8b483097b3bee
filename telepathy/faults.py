"""Fault points for tests: kill this very process at a named point of the save path.

`TELEPATHY_FAULT="<point>@<step>[:<rank>]"` makes the process SIGKILL itself when it reaches
`<point>` while saving step `<step>` (on every rank, or only `<rank>`). This is a real
kill of a real process at a chosen moment, not a mock; unset, every call is a no-op.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Mapping

POINTS = ("save.start", "save.engine_done", "save.state_done", "save.hashed",
          "save.manifest_tmp", "save.done", "prune.manifest_removed", "step.exception")


@dataclass(frozen=True)
class FaultPlan:
    point: str | None = None
    step: int = -1
    rank: int | None = None

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> "FaultPlan":
        spec = env.get("TELEPATHY_FAULT", "")
        if not spec:
            return cls()
        point, _, rest = spec.partition("@")
        step, _, rank = rest.partition(":")
        if point not in POINTS or not step.isdigit():
            raise ValueError(f"TELEPATHY_FAULT={spec!r}: expected <point>@<step>[:<rank>] with a "
                             f"point among {', '.join(POINTS)}")
        return cls(point, int(step), int(rank) if rank else None)

    def hit(self, point: str, step: int, rank: int) -> None:
        if point == self.point and step == self.step and self.rank in (None, rank):
            if point == "step.exception":
                raise RuntimeError(f"injected failure at step {step} (TELEPATHY_FAULT)")
            os.kill(os.getpid(), signal.SIGKILL)
