"""Choosing the GPU count at submit time: which count finishes the remaining steps soonest.
Pure: it reads what the scheduler said and what the run measured; it asks nobody.

finish(n) = wait for n GPUs (from `sbatch --test-only`) + start-up + remaining steps x step time(n).
An option is a node count and a GPU count per node: n = nodes x GPUs ranks. Step times come from
the run's own metrics where it has run at that world size, else from the nearest measured world
size scaled by the throughput model, else from the model alone (which knows no difference between
links inside a node and between nodes: one `placement.scaling` factor per doubling).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .memory import ModelShape
from .placement import Plan, step_time_s

STARTUP_S = 120.0
"""Start-up of an allocation: processes, imports, loading (and converting) the checkpoint."""

_START = re.compile(r"to start at (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)")


def parse_test_only(text: str) -> datetime | None:
    """The start time in `sbatch --test-only` output ("... to start at 2026-11-23T05:10:00 ...")."""
    match = _START.search(text)
    return datetime.fromisoformat(match.group(1)) if match else None


@dataclass(frozen=True)
class Option:
    gpus: int
    """GPUs (ranks) per node."""
    plan: Plan | None
    """None when no placement exists for this count (see `error`)."""
    error: str | None = None
    step_s: float | None = None
    step_source: str = ""
    """Where step_s came from: "measured", "scaled from N GPUs", or "model"."""
    wait_s: float | None = None
    """Seconds until SLURM would start it; None when not asked or it cannot start."""
    nodes: int = 1

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus

    @property
    def name(self) -> str:
        return f"{self.gpus} GPU(s)" if self.nodes == 1 else \
            f"{self.nodes} nodes x {self.gpus} GPU(s)"

    def run_s(self, steps: int) -> float | None:
        return None if self.step_s is None else STARTUP_S + steps * self.step_s

    def finish_s(self, steps: int) -> float | None:
        run = self.run_s(steps)
        return None if run is None or self.wait_s is None else self.wait_s + run


def measured_step_times(metrics: Iterable[dict[str, Any]]) -> dict[int, float]:
    """Median step time per world size over a run's metrics."""
    by_world: dict[int, list[float]] = {}
    for row in metrics:
        if row.get("step_time_s") and row.get("world_size"):
            by_world.setdefault(int(row["world_size"]), []).append(float(row["step_time_s"]))
    return {w: statistics.median(v) for w, v in by_world.items()}


def step_time(gpus: int, shape: ModelShape, tokens_per_step: int, measured: dict[int, float],
              gpu_tflops: float, mfu: float, scaling: float) -> tuple[float, str]:
    """Seconds per step on `gpus` GPUs, and where the figure came from."""
    if gpus in measured:
        return measured[gpus], "measured"
    model = lambda n: step_time_s(shape, tokens_per_step, n, gpu_tflops, mfu, scaling)  # noqa: E731
    if measured:
        base = min(measured, key=lambda w: (abs(w - gpus), w))
        return measured[base] * model(gpus) / model(base), f"scaled from {base} GPU(s)"
    return model(gpus), "model"


def recommend(options: list[Option], steps: int) -> Option | None:
    """The option that finishes soonest; on a tie (within 1%), the one with fewer GPUs, then
    the one on fewer nodes."""
    timed = [o for o in options if o.plan is not None and o.finish_s(steps) is not None]
    if not timed:
        return None
    best = min(o.finish_s(steps) for o in timed)
    return min((o for o in timed if o.finish_s(steps) <= best * 1.01 + 1e-9),
               key=lambda o: (o.ranks, o.nodes))
