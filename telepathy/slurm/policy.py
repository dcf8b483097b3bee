"""Why an allocation ended and whether to requeue it. Pure: plain data in, decisions out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..core.events import AllocationEnd, Event
from ..core.exits import BAD_INPUT, FINISHED, HUNG, NODE_LOST, OUT_OF_MEMORY

# Time limits and --signal are checked every 30 s by slurmctld (compiled in), so the warning
# arrives between signal_lead_s and signal_lead_s + 30 s before the limit.
SIGNAL_CHECK_S = 30


def parse_time(value: str | None) -> float | None:
    if not value or value in ("None", "Unknown", "N/A"):
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def classify_cause(job: Mapping[str, str], now: float, signal_lead_s: int) -> str:
    """preemption, time_limit or user, from `scontrol show job` fields at signal time.

    Measured on SLURM 22.05: a preempted job has PreemptTime set and EndTime = now + GraceTime;
    after the --signal warning EndTime is within signal_lead_s + 30 s; `scancel -s TERM`
    changes neither.
    """
    if parse_time(job.get("PreemptTime")) is not None:
        return "preemption"
    end = parse_time(job.get("EndTime"))
    if end is not None and end - now <= signal_lead_s + SIGNAL_CHECK_S + 5:
        return "time_limit"
    return "user"


def this_allocation(events: list[dict[str, Any]], job_id: str | None,
                    restart_count: int | None) -> list[dict[str, Any]]:
    """The events of the allocation now ending: from its own `launch` on (none if it never got
    that far: then the last launch belongs to an earlier allocation). `restart_count` None: the
    last launch of `job_id` (a launcher without SLURM's restart count)."""
    for i in range(len(events) - 1, -1, -1):
        e = events[i]
        if e.get("event") == Event.LAUNCH:
            mine = e.get("job_id") == job_id and restart_count in (None, e.get("slurm_restart_count"))
            return events[i:] if mine else []
    return []


def effective_exit(exit_code: int, events: list[dict[str, Any]], preempt_code: int) -> int:
    """What the allocation did, from its own events rather than srun's status.

    srun reports a rank killed by --kill-on-bad-exit (143, 137) when another rank left first
    with 75, although the checkpoint was complete; rank 0's events say what happened. Likewise a
    rank's `hang` or `oom` event names why the others were stopped (exits.HUNG, OUT_OF_MEMORY).
    """
    kinds = {e.get("event") for e in events}
    if Event.FINISHED in kinds:
        return FINISHED
    if Event.PREEMPTED in kinds:
        return preempt_code
    if Event.HANG in kinds:
        return HUNG
    if Event.OOM in kinds:
        return OUT_OF_MEMORY
    if Event.NODE_LOST in kinds:
        return NODE_LOST
    if Event.SIGNAL in kinds:
        return preempt_code
    return exit_code


@dataclass(frozen=True)
class Decision:
    requeue: bool
    reason: str


def crash_loop(history: list[AllocationEnd], limit: int, preempt_code: int) -> bool:
    """The last `limit` allocations all crashed and none advanced the newest checkpoint.

    An out-of-memory exit (76) is not such a crash: it carried a smaller micro-batch to the
    next allocation (there are only so many: the micro-batch halves each time)."""
    if len(history) < limit:
        return False
    for i in range(len(history) - limit, len(history)):
        previous = history[i - 1].checkpoint_step if i > 0 else 0
        crashed = history[i].exit_code not in (FINISHED, preempt_code, OUT_OF_MEMORY)
        if not crashed or history[i].checkpoint_step > previous:
            return False
    return True


def decide(history: list[AllocationEnd], restart_count: int, max_restarts: int, crash_loop_limit: int,
           preempt_code: int) -> Decision:
    """Whether to requeue after the allocation that ended last (`history[-1]`)."""
    last = history[-1]
    if last.exit_code == FINISHED:
        return Decision(False, "the run finished")
    if last.exit_code == BAD_INPUT:
        return Decision(False, "bad input (exit 2): fix the config or data; requeueing would fail again")
    if restart_count >= max_restarts:
        return Decision(False, f"restart cap reached: SLURM_RESTART_COUNT={restart_count} >= "
                               f"preemption.max_restarts={max_restarts}; raise it to go on")
    if last.exit_code == preempt_code:
        return Decision(True, "saved after a signal")
    if crash_loop(history, crash_loop_limit, preempt_code):
        return Decision(False, f"crash loop: the last {crash_loop_limit} allocations all failed "
                               f"without getting past the checkpoint of step {last.checkpoint_step}; "
                               "see the job log, fix the cause, then resubmit (the run resumes)")
    what = {HUNG: "hung (exit 124: no progress for train.hang_timeout_s; stacks in the log)",
            OUT_OF_MEMORY: "ran out of memory on one rank (exit 76; a smaller micro-batch is "
                           "carried to the next allocation)",
            NODE_LOST: "lost a node (exit 79: no heartbeat for train.node_timeout_s)"}.get(last.exit_code,
                                                                   f"crashed with exit {last.exit_code}")
    return Decision(True, f"{what}; requeueing to resume from the checkpoint of step "
                          f"{last.checkpoint_step}")
