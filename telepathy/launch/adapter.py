"""Every reach into submitit's internals (submitit 1.5): tested against the real thing.

- The executors run each rank as `python -u -m telepathy.launch.node FOLDER` instead of
  `submitit.core._submit` (their `_submitit_command_str`).
- `StateWatcher` follows SLURM job states with `sacct` where the cluster keeps accounting and
  with `scontrol` where it does not (submitit asks sacct alone: without accounting a job that
  ended without result files would look UNKNOWN, and `job.results()` would wait forever).
- `keep_telepathy_handlers` replaces `JobEnvironment._handle_signals` (rank 0 checkpointing
  inside the handler, SIGTERM ignored) in the node process.
- `write_error` writes a task's result file as submitit's own `process_job` does.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from submitit.core import job_environment, utils
from submitit.local.debug import DebugExecutor
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE, LocalExecutor
from submitit.slurm.slurm import SlurmExecutor, SlurmInfoWatcher, SlurmJob

from ..core.proc import CommandError
from ..slurm import scontrol

log = logging.getLogger("telepathy.launch")

NODE_MODULE = "telepathy.launch.node"
LOCAL_RESTART = LOCAL_REQUEUE_RETURN_CODE
"""The exit code on which submitit's local controller starts the tasks again (144)."""
LOCAL_RUNS = 6
"""How often submitit's local controller runs a job at most (its Controller.run max_retry)."""
SUBMITIT_SIGNAL = "SIG" + job_environment.JobEnvironment.USR_SIG
"""submitit's own warning signal, SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise (its
LocalExecutor's time limit, `job._interrupt()`)."""
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "GONE")
"""Final job states. Not PREEMPTED: with PreemptMode=REQUEUE it passes on to PENDING. GONE:
slurmctld no longer knows the job (MinJobAge passed) and there is no accounting to ask."""


def node_command(python: str, folder: Path) -> str:
    return " ".join([python, "-u -m", NODE_MODULE, shlex.quote(str(folder))])


class StateWatcher(SlurmInfoWatcher):
    """Job states from sacct, or from `scontrol show job` when the cluster keeps no accounting
    (the local cluster; slurmctld remembers a finished job for MinJobAge seconds)."""

    def __init__(self, delay_s: int = 30) -> None:
        super().__init__(delay_s)
        self.accounting: bool | None = None
        """None: not asked yet; False: sacct failed once, scontrol from then on."""

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        """Done in a final state only (submitit counts every state it does not list as done:
        SUSPENDED, CONFIGURING, REQUEUE_HOLD, SIGNALING ...)."""
        state = self.get_state(job_id, mode=mode).split()
        return bool(state) and state[0].upper() in ENDED

    def update(self) -> None:
        pending = sorted({j.split("_")[0] for j in self._registered - self._finished})
        if not pending:
            return
        self._num_calls += 1
        asked = False
        if self.accounting is not False:
            try:
                self._info_dict.update(self.read_info(scontrol.sacct(pending)))
                self.accounting = asked = True
            except CommandError as exc:
                if "accounting storage is disabled" in exc.stderr:
                    log.info("no SLURM accounting here: following jobs with scontrol")
                    self.accounting = False  # for good; any other failure: sacct again next time
        if not asked:
            for job_id in pending:
                try:
                    fields = scontrol.show_job(job_id)
                except CommandError as exc:  # forgotten by slurmctld (MinJobAge), or unreachable
                    if "Invalid job id" in exc.stderr:
                        self._info_dict[job_id] = {"JobID": job_id, "State": "GONE"}
                    continue
                self._info_dict[job_id] = {"JobID": job_id, "State": fields.get("JobState", ""),
                                           "NodeList": fields.get("NodeList", "")}
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)


class TelepathySlurmJob(SlurmJob):
    watcher = StateWatcher()


class TelepathySlurmExecutor(SlurmExecutor):
    job_class = TelepathySlurmJob

    @property
    def _submitit_command_str(self) -> str:
        return node_command(self.python, self.folder)


class TelepathyLocalExecutor(LocalExecutor):
    @property
    def _submitit_command_str(self) -> str:
        return node_command(self.python, self.folder)


def executor(kind: str, folder: Path) -> Any:
    if kind == "slurm":
        return TelepathySlurmExecutor(folder, python=shlex.quote(sys.executable))
    if kind == "local":
        return TelepathyLocalExecutor(folder, python=shlex.quote(sys.executable))
    return DebugExecutor(folder)


def keep_telepathy_handlers() -> None:
    """In this process, submitit installs no signal handlers: telepathy's stay."""

    def handle_signals(self: Any, paths: Any, submission: Any) -> None:
        log.debug("submitit's signal handlers skipped: telepathy's flag handles signals")

    job_environment.JobEnvironment._handle_signals = handle_signals


def process_job(folder: str) -> None:
    from submitit.core.submission import process_job as run

    run(folder)


def task_paths(folder: Path, job_id: str, task: int) -> utils.JobPaths:
    return utils.JobPaths(folder, job_id=job_id, task_id=task)


def kind(environ: dict[str, str] | None = None) -> str | None:
    """'slurm', 'local' or 'debug' inside a submitit job; None outside one."""
    env = os.environ if environ is None else environ
    if "SUBMITIT_DEBUG_JOB_ID" in env:
        return "debug"
    return env.get("SUBMITIT_EXECUTOR") or None


def log_files() -> dict[str, str]:
    """This task's stdout and stderr files (empty outside submitit's SLURM and local jobs)."""
    if kind() not in ("slurm", "local"):
        return {}
    paths = job_environment.JobEnvironment().paths
    return {"stdout": str(paths.stdout), "stderr": str(paths.stderr)}


def write_error(folder: Path, job_id: str, task: int, message: str) -> bool:
    """A task's result file saying the job failed with `message`, unless it has one already."""
    paths = task_paths(folder, job_id, task)
    if paths.result_pickle.exists():
        return False
    with utils.temporary_save_path(paths.result_pickle) as tmp:
        utils.cloudpickle_dump(("error", message), tmp)
    return True


@contextmanager
def clean_environment() -> Iterator[None]:
    """submitit's `clean_env` (no SLURM_*, SUBMITIT_*, RANK, MASTER_* of an enclosing job leak
    into the new one), keeping SLURM_CONF: the cluster to submit to."""
    from submitit.helpers import clean_env

    conf = os.environ.get("SLURM_CONF")
    with clean_env():
        if conf is not None:
            os.environ["SLURM_CONF"] = conf
        try:
            yield
        finally:
            os.environ.pop("SLURM_CONF", None)
