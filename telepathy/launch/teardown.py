"""`python -m telepathy.launch.teardown`: the last step of a submitit-launched SLURM job, run by
the batch shell after srun (submitit's `teardown` lines), as `telepathy requeue` is run by
slurm/preemptible.slurm.

It ends the allocation with the one requeue policy and requeues the job itself (SLURM does not
requeue a job that exits in its grace time). When the job is neither requeued nor finished
(bad input, restart cap, crash loop, a failed requeue) it writes why into every task's result
file that is missing, so `job.results()` raises with that reason instead of waiting.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..core import logs
from ..slurm.env import SlurmEnv
from ..slurm.requeue import requeue_after
from .job import not_requeued

log = logging.getLogger("telepathy.launch")


def main(argv: list[str] | None = None) -> int:
    logs.configure(0)
    p = argparse.ArgumentParser(prog="python -m telepathy.launch.teardown", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--folder", required=True, help="the job's submitit folder")
    p.add_argument("--tasks", type=int, required=True, help="tasks (ranks) of the job")
    p.add_argument("--exit-code", type=int, required=True, help="exit status of srun")
    args = p.parse_args(argv)
    status, why_not = requeue_after(args.config, args.run_dir, args.exit_code)
    job_id = SlurmEnv.from_mapping(os.environ).job_id
    if why_not is not None and job_id is not None:
        from . import adapter

        message = not_requeued(args.run_dir, why_not)
        written = [t for t in range(args.tasks)
                   if adapter.write_error(Path(args.folder), job_id, t, message)]
        log.info("result files of task(s) %s say why the job ended", written or "none")
    return status  # not 0 whenever there is a why_not: the job ends FAILED


if __name__ == "__main__":
    sys.exit(main())
