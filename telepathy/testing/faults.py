"""Fault points for tests: kill (or hold) this very process at a named point of the save path.

`TELEPATHY_FAULT="<point>@<step>[:<rank>][,sleep=<seconds>][,times=<n>]"` (several joined by
`;`, step `*` for any step) makes the process
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
from collections.abc import Mapping
from dataclasses import dataclass, field

POINTS = ("save.start", "save.engine_done", "save.file_written", "save.hashed",
          "save.manifest_tmp", "save.done", "prune.manifest_removed", "step.start",
          "step.exception", "step.oom")
ANY_STEP = -1


@dataclass(frozen=True)
class FaultPlan:
    point: str | None = None
    step: int = -1
    rank: int | None = None
    sleep_s: float = 0.0
    times: int = 0
    """How often the point fires; 0: every time it is reached."""
    fired: list[int] = field(default_factory=lambda: [0], compare=False)
    more: tuple[FaultPlan, ...] = ()
    """Further faults of the same run (specs separated by ';')."""

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> FaultPlan:
        specs = [s for s in env.get("TELEPATHY_FAULT", "").split(";") if s]
        if not specs:
            return cls()
        first, *rest = [cls._parse(s) for s in specs]
        return cls(first.point, first.step, first.rank, first.sleep_s, first.times,
                   more=tuple(rest))

    @classmethod
    def _parse(cls, spec: str) -> FaultPlan:
        where, *actions = spec.split(",")
        point, _, rest = where.partition("@")
        step, _, rank = rest.partition(":")
        options = dict(a.partition("=")[::2] for a in actions)
        if (point not in POINTS or not (step.isdigit() or step == "*")
                or set(options) - {"sleep", "times"} or not options.get("times", "0").isdigit()):
            raise ValueError(f"TELEPATHY_FAULT={spec!r}: expected <point>@<step or *>[:<rank>]"
                             f"[,sleep=<seconds>][,times=<n>] with a point among "
                             f"{', '.join(POINTS)}; several separated by ';'")
        return cls(point, ANY_STEP if step == "*" else int(step), int(rank) if rank else None,
                   float(options.get("sleep") or 0), int(options.get("times") or 0))

    def hit(self, point: str, step: int, rank: int) -> None:
        for other in self.more:
            other.hit(point, step, rank)
        if point == self.point and self.step in (ANY_STEP, step) and self.rank in (None, rank):
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
