"""Fault points for tests: kill (or hold) this very process at a named point of the save path.

`TELEPATHY_FAULT="<point>@<step>[:<rank>][,sleep=<seconds>][,times=<n>]"` (several joined by
`;`, step `*` for any step) makes the process
SIGKILL itself when it reaches `<point>` while saving step `<step>` (on every rank, or only
`<rank>`), or, with `sleep=`, pause there so a test can send a signal into the middle of a save.
`step.exception` raises an error instead, and `step.oom` raises torch.OutOfMemoryError, as CUDA
does, inside the step (after a forward pass); `times=` limits how often a point fires. This is a real
kill of a real process at a chosen moment, not a mock; unset, every call is a no-op.

`TELEPATHY_FAULT_FILE=<path>` arms faults while the process runs (the chaos harness): the file
holds specs in the same syntax, read again whenever it changes; the first process to fire one
deletes the file first, so the fault strikes once, on one rank, in one allocation.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

POINTS = ("save.start", "save.engine_done", "save.file_written", "save.hashed",
          "save.manifest_tmp", "save.done", "prune.manifest_removed", "step.start",
          "step.exception", "step.oom", "eval.batch", "mirror.files_uploaded")
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
    live: LiveFaults | None = None
    """Faults armed at run time through TELEPATHY_FAULT_FILE."""

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> FaultPlan:
        specs = [s for s in env.get("TELEPATHY_FAULT", "").split(";") if s]
        live = LiveFaults(env["TELEPATHY_FAULT_FILE"]) if env.get("TELEPATHY_FAULT_FILE") else None
        if not specs:
            return cls(live=live)
        first, *rest = [cls._parse(s) for s in specs]
        return cls(first.point, first.step, first.rank, first.sleep_s, first.times,
                   more=tuple(rest), live=live)

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
        if self.live is not None:
            self.live.hit(point, step, rank)
        for other in self.more:
            other.hit(point, step, rank)
        if self.fires(point, step, rank):
            self.strike(point, step)

    def fires(self, point: str, step: int, rank: int) -> bool:
        """Whether this spec fires here (and count it)."""
        if point == self.point and self.step in (ANY_STEP, step) and self.rank in (None, rank):
            if self.times and self.fired[0] >= self.times:
                return False
            self.fired[0] += 1
            return True
        return False

    def strike(self, point: str, step: int) -> None:
        """Do what this spec does: pause, raise, or SIGKILL this process."""
        if self.sleep_s:
            time.sleep(self.sleep_s)
            return
        if point == "step.exception":
            raise RuntimeError(f"injected failure at step {step} (TELEPATHY_FAULT)")
        if point == "step.oom":  # what CUDA raises: a fake of a GPU's memory running out
            import torch
            raise torch.OutOfMemoryError(f"injected out-of-memory at step {step} "
                                         "(TELEPATHY_FAULT)")
        os.kill(os.getpid(), signal.SIGKILL)


class LiveFaults:
    """The specs of a fault file, read again when it changes; consumed when one fires."""

    def __init__(self, path: str):
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._plans: list[FaultPlan] = []

    def hit(self, point: str, step: int, rank: int) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._seen, self._plans = None, []
            return
        if (st.st_mtime_ns, st.st_size) != self._seen:
            self._seen = (st.st_mtime_ns, st.st_size)
            try:
                with open(self.path, encoding="utf-8") as f:
                    text = f.read()
                self._plans = [FaultPlan._parse(s.strip()) for s in text.replace("\n", ";").split(";")
                               if s.strip()]
            except (OSError, ValueError):
                self._plans = []
        for plan in self._plans:
            if plan.fires(point, step, rank):
                try:
                    os.unlink(self.path)  # once: no other rank or allocation fires it again
                except FileNotFoundError:
                    return  # another rank took it first
                self._plans = []
                plan.strike(point, step)
                return
