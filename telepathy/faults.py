"""Fault points for tests: kill (or hold) this very process at a named point of the save path.

`TELEPATHY_FAULT="<point>@<step>[:<rank>][,sleep=<seconds>][,times=<n>]"` makes the process
SIGKILL itself when it reaches `<point>` while saving step `<step>` (on every rank, or only
`<rank>`), or, with `sleep=`, pause there so a test can send a signal into the middle of a save.
`step.exception` raises an error instead, and `step.oom` raises torch.OutOfMemoryError, as CUDA
does, inside the step (after a forward pass); `times=` limits how often a point fires. This is a real
kill of a real process at a chosen moment, not a mock; unset, every call is a no-op.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Mapping

POINTS = ("save.start", "save.engine_done", "save.state_done", "save.hashed",
          "save.manifest_tmp", "save.done", "prune.manifest_removed", "step.exception", "step.oom")


@dataclass(frozen=True)
class FaultPlan:
    point: str | None = None
    step: int = -1
    rank: int | None = None
    sleep_s: float = 0.0
    times: int = 0
    """How often the point fires; 0: every time it is reached."""
    fired: list[int] = field(default_factory=lambda: [0], compare=False)

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> "FaultPlan":
        spec = env.get("TELEPATHY_FAULT", "")
        if not spec:
            return cls()
        where, *actions = spec.split(",")
        point, _, rest = where.partition("@")
        step, _, rank = rest.partition(":")
        options = dict(a.partition("=")[::2] for a in actions)
        if (point not in POINTS or not step.isdigit() or set(options) - {"sleep", "times"}
                or not options.get("times", "0").isdigit()):
            raise ValueError(f"TELEPATHY_FAULT={spec!r}: expected <point>@<step>[:<rank>]"
                             f"[,sleep=<seconds>][,times=<n>] with a point among "
                             f"{', '.join(POINTS)}")
        return cls(point, int(step), int(rank) if rank else None,
                   float(options.get("sleep") or 0), int(options.get("times") or 0))

    def hit(self, point: str, step: int, rank: int) -> None:
        if point == self.point and step == self.step and self.rank in (None, rank):
            if self.times and self.fired[0] >= self.times:
                return
            self.fired[0] += 1
            if self.sleep_s:
                time.sleep(self.sleep_s)
                return
            if point == "step.exception":
                raise RuntimeError(f"injected failure at step {step} (TELEPATHY_FAULT)")
            if point == "step.oom":  # what CUDA raises; a test hook to reach the recovery on CPU
                import torch
                raise torch.OutOfMemoryError(f"injected out-of-memory at step {step} "
                                             "(TELEPATHY_FAULT)")
            os.kill(os.getpid(), signal.SIGKILL)
