"""Fault points for tests: kill (or hold) this very process at a named point of the save path.

`TELEPATHY_FAULT="<point>@<step>[:<rank>][,sleep=<seconds>]"` makes the process SIGKILL itself
when it reaches `<point>` while saving step `<step>` (on every rank, or only `<rank>`), or, with
`sleep=`, pause there so a test can send a signal into the middle of a save. This is a real
kill of a real process at a chosen moment, not a mock; unset, every call is a no-op.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Mapping

POINTS = ("save.start", "save.engine_done", "save.state_done", "save.hashed",
          "save.manifest_tmp", "save.done", "prune.manifest_removed", "step.exception")


@dataclass(frozen=True)
class FaultPlan:
    point: str | None = None
    step: int = -1
    rank: int | None = None
    sleep_s: float = 0.0

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> "FaultPlan":
        spec = env.get("TELEPATHY_FAULT", "")
        if not spec:
            return cls()
        where, _, action = spec.partition(",")
        point, _, rest = where.partition("@")
        step, _, rank = rest.partition(":")
        sleep = action.removeprefix("sleep=")
        if point not in POINTS or not step.isdigit() or (action and sleep == action):
            raise ValueError(f"TELEPATHY_FAULT={spec!r}: expected <point>@<step>[:<rank>]"
                             f"[,sleep=<seconds>] with a point among {', '.join(POINTS)}")
        return cls(point, int(step), int(rank) if rank else None, float(sleep or 0))

    def hit(self, point: str, step: int, rank: int) -> None:
        if point == self.point and step == self.step and self.rank in (None, rank):
            if self.sleep_s:
                time.sleep(self.sleep_s)
                return
            if point == "step.exception":
                raise RuntimeError(f"injected failure at step {step} (TELEPATHY_FAULT)")
            os.kill(os.getpid(), signal.SIGKILL)
