"""`telepathy launch` (`python -m telepathy.launch`): start or resume a run as a submitit job.

    python -m telepathy.launch --config configs/tiny-cpu.yaml --run-dir runs/mine --gpus 2
    python -m telepathy.launch --config C --run-dir D --nodes 2 --gpus 4     # 8 ranks
    python -m telepathy.launch --config C --run-dir D --executor local --wait
    python -m telepathy.launch --config C --run-dir D --gpus auto --set train.steps=500

Prints the job id, the submitit folder and the log files; `--wait` follows the run (the view
of `telepathy tail --follow`) until the job ends, then prints rank 0's summary. The debug
executor runs in this process (always waits). Exit status: 0 submitted (or, with --wait,
finished), 1 the job ended without finishing, 2 bad input (nothing was submitted).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..core import exits, logs
from ..core.errors import TelepathyError
from ..core.proc import CommandError
from ..train.resume import run_arguments
from .api import EXECUTORS

log = logging.getLogger("telepathy.launch")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = run_arguments(argparse.ArgumentParser(
        prog="telepathy launch", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--gpus", default=None,
                   help="1-4 per node, or auto (default: slurm.gpus_per_node)")
    p.add_argument("--nodes", type=int, default=1,
                   help="nodes, each with --gpus ranks (slurm executor; default 1)")
    p.add_argument("--executor", choices=EXECUTORS, default="slurm")
    p.add_argument("--wait", action="store_true", help="follow the run until the job ends")
    p.add_argument("--interval", type=float, default=5.0, help="--wait refreshes this often (s)")
    return p.parse_args(argv)


def _gpus(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise TelepathyError(f"--gpus {value!r}: use 1-4 or auto") from None


def main(argv: list[str] | None = None) -> int:
    logs.configure(0)
    args = parse_args(argv)
    from .api import FOLDER, submit

    try:
        job = submit(args.config, args.run_dir, gpus=_gpus(args.gpus), nodes=args.nodes,
                     executor=args.executor,
                     overrides=args.set, force=args.force)
    except (TelepathyError, CommandError) as exc:
        log.error("%s", exc)
        return exits.BAD_INPUT
    except Exception as exc:  # submitit's: sbatch refused the job, no srun, a bad parameter
        log.error("nothing was submitted: %s: %s", type(exc).__name__, exc)
        return exits.BAD_INPUT
    folder = Path(args.run_dir).absolute() / FOLDER
    print(f"job {job.job_id} ({args.executor} executor, {job.num_tasks} task(s))")
    print(f"submitit folder: {folder}")
    for task in range(job.num_tasks):
        paths = job.task(task).paths if job.num_tasks > 1 else job.paths
        print(f"task {task} logs: {paths.stdout} {paths.stderr}")
    if not (args.wait or args.executor == "debug"):
        return exits.OK
    return wait(job, Path(args.run_dir), args.interval, view=args.executor != "debug")


def wait(job, run_dir: Path, interval_s: float, view: bool = True) -> int:
    """Follow the run until the job is done (the debug executor runs it here, unwatched: a
    debugger may need the terminal); print its summary, or why it did not finish."""
    from ..watch.tail import follow

    try:
        if view:
            follow(run_dir, lambda: job.done(), interval_s)
        result = job.results()[0]
    except Exception as exc:  # submitit's FailedJobError / UncompletedJobError carry the reason
        print(f"job {job.job_id} ended without finishing:\n{exc}", file=sys.stderr)
        return exits.FAILED
    print(json.dumps(result, indent=1))
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
