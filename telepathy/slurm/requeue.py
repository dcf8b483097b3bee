"""`telepathy requeue` (`python -m telepathy.requeue`): run by the job script after `srun`.

SLURM does not requeue a job that exits during its preemption grace time, and a job that
saved after a time-limit warning must go back in the queue too: this decides (finished, bad
input, restart cap, crash loop) and requeues the job itself with `scontrol requeue`.
Its exit status is the job's: 0 when requeued or finished, the training exit status otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..checkpoint.directory import complete_steps
from ..config import Config, load_config
from ..core import exits, logs
from ..core.errors import TelepathyError
from ..core.eventlog import EventLog
from ..core.events import AllocationEnd, Event, Stamp, allocation_ends, launches, of_kind
from ..core.jsonl import JsonlWriter, read_jsonl
from ..core.paths import RunPaths
from ..core.proc import CommandError
from . import scontrol
from .env import SlurmEnv
from .policy import Decision, classify_cause, decide, effective_exit, this_allocation

log = logging.getLogger("telepathy.requeue")


@dataclass(frozen=True)
class Ending:
    """How an allocation ended and what to do next."""

    exit_code: int
    """What the allocation did (its events' word over srun's status)."""
    decision: Decision
    cause: str | None
    """preemption, time_limit or user after a save on a signal; None otherwise."""


def end_allocation(cfg: Config, paths: RunPaths, job_id: str | None, restart_count: int,
                   exit_code: int, cause_of: Callable[[list[dict[str, Any]]], str | None],
                   launched: bool | None = None) -> Ending:
    """Record the end of the allocation `restart_count` of `job_id` (its training step exited
    with `exit_code`) and decide with the one policy (telepathy.slurm.policy) whether to
    requeue. The job script's requeue step and telepathy.launch both end allocations here.

    `cause_of(this allocation's events)` tells why a signal came (asked only after a save on a
    signal). `launched`, from a launcher without SLURM's restart count (submitit's local
    executor): whether this allocation wrote its launch event (then the job's last one is it);
    None finds it by job id and SLURM restart count.
    """
    history = list(read_jsonl(paths.events))
    if launched is None:
        mine = this_allocation(history, job_id, restart_count)
    else:
        mine = this_allocation(history, job_id, None) if launched else []
    effective = effective_exit(exit_code, mine, cfg.preemption.exit_code)
    if effective != exit_code:
        log.info("the training step exited with %d, but this allocation's events say %d",
                 exit_code, effective)
    signals = of_kind(mine, Event.SIGNAL)
    cause = cause_of(mine) if effective == cfg.preemption.exit_code else None
    steps = complete_steps(paths.checkpoints)
    ended = AllocationEnd(effective, steps[-1] if steps else 0, exit_code, restart_count)
    decision = decide(allocation_ends(history) + [ended], restart_count,
                      cfg.preemption.max_restarts, cfg.preemption.crash_loop_limit,
                      cfg.preemption.exit_code)
    paths.root.mkdir(parents=True, exist_ok=True)
    # Stamped as the allocation that ends: its launch, or (it never launched) the next index.
    if mine:
        stamp = Stamp(launches(history) - 1, job_id, mine[0].get("world_size"))
    else:
        stamp = Stamp(launches(history), job_id, None)
    events = EventLog(JsonlWriter(paths.events), stamp)
    try:
        events.emit(Event.ALLOCATION_END, **ended.fields())
        outcome = {**ended.fields(), "cause": cause, "reason": decision.reason,
                   "signal": signals[-1].get("signal") if signals else None}
        if decision.requeue:
            log.info("requeueing job %s (restart %d, cause: %s): %s", job_id, restart_count + 1,
                     cause or "crash", decision.reason)
            events.emit(Event.REQUEUE, **outcome)
        else:
            level = logging.INFO if effective == exits.FINISHED else logging.ERROR
            log.log(level, "not requeueing job %s: %s", job_id, decision.reason)
            if effective != exits.FINISHED:
                events.emit(Event.REQUEUE_REFUSED, **outcome)
    finally:
        events.close()
    return Ending(effective, decision, cause)


def slurm_cause(job_id: str, signal_lead_s: int) -> str | None:
    """Why SLURM signalled the job, from `scontrol show job` (None when SLURM cannot say)."""
    try:
        return classify_cause(scontrol.show_job(job_id), time.time(), signal_lead_s)
    except CommandError as exc:
        log.warning("could not read the job from SLURM to tell the cause: %s", exc)
        return None


def main(argv: list[str] | None = None) -> int:
    logs.configure(0)
    p = argparse.ArgumentParser(prog="telepathy requeue", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--exit-code", type=int, required=True, help="exit status of the training step")
    args = p.parse_args(argv)
    return requeue_after(args.config, args.run_dir, args.exit_code)[0]


def requeue_after(config: str, run_dir: str, exit_code: int,
                  environ: Mapping[str, str] = os.environ) -> tuple[int, str | None]:
    """End this SLURM allocation and requeue the job if the policy says so.

    Returns the job's exit status (0 when requeued or finished, the training exit status
    otherwise) and, when the job was neither requeued nor finished, why not.
    """
    slurm = SlurmEnv.from_mapping(environ)
    if not slurm.in_job:
        log.error("not inside a SLURM job (SLURM_JOB_ID unset): nothing to requeue")
        return exits.BAD_INPUT, "not inside a SLURM job"
    try:
        cfg = load_config(config)
    except TelepathyError as exc:
        log.error("%s", exc)
        return exit_code or exits.BAD_INPUT, str(exc)
    ending = end_allocation(cfg, RunPaths.at(run_dir), slurm.job_id, slurm.restart_count,
                            exit_code, lambda _: slurm_cause(slurm.job_id, cfg.slurm.signal_lead_s))
    if not ending.decision.requeue:
        finished = ending.exit_code == exits.FINISHED
        return ending.exit_code, None if finished else ending.decision.reason
    try:
        scontrol.requeue(slurm.job_id, cfg.slurm.requeue_timeout_s)
    except CommandError as exc:
        log.error("scontrol requeue failed: %s; resubmit with the same TELEPATHY_RUN_DIR to "
                  "resume", exc)
        return ending.exit_code, f"scontrol requeue failed: {exc}"
    return exits.OK, None


if __name__ == "__main__":
    sys.exit(main())
