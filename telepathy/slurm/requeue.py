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

from ..checkpoint.directory import complete_steps
from ..config import load_config
from ..core import exits, logs
from ..core.errors import TelepathyError
from ..core.eventlog import EventLog
from ..core.events import AllocationEnd, Event, Stamp, allocation_ends, launches, of_kind
from ..core.jsonl import JsonlWriter, read_jsonl
from ..core.paths import RunPaths
from ..core.proc import CommandError
from . import scontrol
from .env import SlurmEnv
from .policy import classify_cause, decide, effective_exit, this_allocation

log = logging.getLogger("telepathy.requeue")


def main(argv: list[str] | None = None) -> int:
    logs.configure(0)
    p = argparse.ArgumentParser(prog="telepathy requeue", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--exit-code", type=int, required=True, help="exit status of the training step")
    args = p.parse_args(argv)
    slurm = SlurmEnv.from_mapping(os.environ)
    if not slurm.in_job:
        log.error("not inside a SLURM job (SLURM_JOB_ID unset): nothing to requeue")
        return exits.BAD_INPUT
    try:
        cfg = load_config(args.config)
    except TelepathyError as exc:
        log.error("%s", exc)
        return args.exit_code or exits.BAD_INPUT
    paths = RunPaths.at(args.run_dir)
    history = list(read_jsonl(paths.events))
    mine = this_allocation(history, slurm.job_id, slurm.restart_count)
    exit_code = effective_exit(args.exit_code, mine, cfg.preemption.exit_code)
    if exit_code != args.exit_code:
        log.info("srun exited with %d, but this allocation's events say %d", args.exit_code,
                 exit_code)
    signals = of_kind(mine, Event.SIGNAL)
    cause = None
    if exit_code == cfg.preemption.exit_code:
        try:
            cause = classify_cause(scontrol.show_job(slurm.job_id), time.time(),
                                   cfg.slurm.signal_lead_s)
        except CommandError as exc:
            log.warning("could not read the job from SLURM to tell the cause: %s", exc)
    steps = complete_steps(paths.checkpoints)
    ended = AllocationEnd(exit_code, steps[-1] if steps else 0, args.exit_code,
                          slurm.restart_count)
    decision = decide(allocation_ends(history) + [ended], slurm.restart_count,
                      cfg.preemption.max_restarts, cfg.preemption.crash_loop_limit,
                      cfg.preemption.exit_code)
    paths.root.mkdir(parents=True, exist_ok=True)
    # Stamped as the allocation that ends: its launch, or (it never launched) the next index.
    if mine:
        stamp = Stamp(launches(history) - 1, slurm.job_id, mine[0].get("world_size"))
    else:
        stamp = Stamp(launches(history), slurm.job_id, None)
    events = EventLog(JsonlWriter(paths.events), stamp)
    events.emit(Event.ALLOCATION_END, **ended.fields())
    outcome = {**ended.fields(), "cause": cause, "reason": decision.reason,
               "signal": signals[-1].get("signal") if signals else None}
    if not decision.requeue:
        level = logging.INFO if exit_code == exits.FINISHED else logging.ERROR
        log.log(level, "not requeueing job %s: %s", slurm.job_id, decision.reason)
        if exit_code != exits.FINISHED:
            events.emit(Event.REQUEUE_REFUSED, **outcome)
        events.close()
        return exit_code
    log.info("requeueing job %s (restart %d, cause: %s): %s", slurm.job_id,
             slurm.restart_count + 1, cause or "crash", decision.reason)
    events.emit(Event.REQUEUE, **outcome)
    events.close()
    try:
        scontrol.requeue(slurm.job_id, cfg.slurm.requeue_timeout_s)
    except CommandError as exc:
        log.error("scontrol requeue failed: %s; resubmit with the same TELEPATHY_RUN_DIR to "
                  "resume", exc)
        return exit_code
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
