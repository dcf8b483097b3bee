"""`Training`: the callable telepathy.launch pickles for submitit, run by every rank.

It returns only when the run has finished: rank 0 the run's summary, the other ranks None.
Anything else leaves the process with an exit status and no result file, and the allocation's
end decides (telepathy.slurm.requeue.end_allocation, one policy for sbatch and submitit): on
SLURM the batch shell's teardown step (telepathy.launch.teardown) requeues the job or writes why
not into the result files; under the local executor rank 0 decides here and exits 144, submitit's
own restart code, to run the tasks again.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint.directory import complete_steps
from ..config import load_config
from ..core import exits, logs
from ..core.errors import TelepathyError
from ..core.events import Event, of_kind
from ..core.jsonl import last_per_step, read_jsonl
from ..core.paths import RunPaths
from ..slurm.env import DistEnv, SlurmEnv
from ..slurm.requeue import end_allocation
from ..train.signals import PreemptionFlag

log = logging.getLogger("telepathy.launch")


class RunNotFinished(TelepathyError):
    """The run stopped and will not be resumed by this job; its directory stays resumable."""


def summary(run_dir: Path, job_id: str | None) -> dict[str, Any]:
    """What `job.results()[0]` holds: the finished run, read from its run directory."""
    paths = RunPaths.at(run_dir)
    events = list(read_jsonl(paths.events))
    finished = of_kind(events, Event.FINISHED)[-1]
    step = finished["step"]
    loss = last_per_step(list(read_jsonl(paths.metrics))).get(step, {}).get("loss")
    # This job's allocations (none to tell apart without a job id: the debug executor).
    mine = [e for e in of_kind(events, Event.LAUNCH) if job_id and e.get("job_id") == job_id]
    steps = complete_steps(paths.checkpoints)
    return {"status": "finished", "step": step, "loss": loss,
            "restarts": max(0, len(mine) - 1), "run_dir": str(paths.root.absolute()),
            "job_id": job_id, "world_size": finished.get("world_size"),
            "allocations": len(of_kind(events, Event.LAUNCH)),
            "checkpoint": str(paths.checkpoint(steps[-1])) if steps else None}


def local_cause(events: list[dict[str, Any]]) -> str:
    """Under the local executor submitit's signal means its time limit; any other, a user."""
    from .adapter import SUBMITIT_SIGNAL

    signals = of_kind(events, Event.SIGNAL)
    return "time_limit" if signals and signals[-1].get("signal") == SUBMITIT_SIGNAL else "user"


@dataclass(frozen=True)
class Training:
    """Start or resume the run in `run_dir` with the config file `config` (the run's
    submitted-config.yaml: overrides applied at submit time)."""

    config: str
    run_dir: str
    force: bool = False

    def __call__(self) -> dict[str, Any] | None:
        from . import adapter, node
        from .adapter import SUBMITIT_SIGNAL

        kind = adapter.kind()
        env = DistEnv.from_mapping(os.environ)
        job_id = SlurmEnv.from_mapping(os.environ).job_id or env.job_id
        logs.configure(env.rank)
        runs_before = len(self._launches(job_id)) if kind == "local" and env.rank == 0 else 0
        code = self._train(node.flag, kind, SUBMITIT_SIGNAL, adapter.log_files())
        if code == exits.FINISHED:
            return summary(Path(self.run_dir), job_id) if env.rank == 0 else None
        if kind == "local":
            return self._end_local_allocation(code, env, runs_before)
        if kind == "debug":
            raise RunNotFinished(f"the run in {self.run_dir} stopped with exit status {code} "
                                 "(75: saved after a signal); submit again to resume it")
        sys.exit(code)  # no result file: the teardown step requeues the job or says why not

    def _train(self, flag: PreemptionFlag | None, kind: str | None, own_signal: str,
               log_files: dict[str, str]) -> int:
        from ..train.resume import execute

        if flag is None and kind in ("slurm", "local"):
            raise RuntimeError("telepathy.launch.node installed no preemption flag in this rank: a "
                               "signal that came during start-up would be lost")
        if kind in ("slurm", "local"):
            gc.disable()  # a rank of its own: start-up without the cyclic collector (resume.main)
        with ExitStack() as stack:
            if flag is None:  # in this process (debug executor): handlers of our own
                from .node import signals

                flag = stack.enter_context(PreemptionFlag(signals()))
            try:
                return execute(self.config, self.run_dir, flag, force=self.force,
                               extra_signals=[own_signal], log_files=log_files)
            except Exception:
                if kind == "debug":  # the debugger gets it
                    raise
                # A result file would end the job: the allocation's end decides.
                log.exception("training failed")
                return exits.FAILED

    def _launches(self, job_id: str | None) -> list[dict[str, Any]]:
        events = list(read_jsonl(RunPaths.at(self.run_dir).events))
        return [e for e in of_kind(events, Event.LAUNCH) if e.get("job_id") == job_id]

    def _end_local_allocation(self, code: int, env: DistEnv, runs_before: int
                              ) -> dict[str, Any] | None:
        """Rank 0 applies the requeue policy; exit 144 runs the tasks again.

        `runs_before`: this job's launches before this run (this run may have died before its
        own). submitit's controller runs a job at most LOCAL_RUNS times: the restart cap is
        lowered to fit, so the last run says why it stops instead of asking in vain."""
        from .adapter import LOCAL_RESTART, LOCAL_RUNS

        if env.rank != 0:
            sys.exit(code)  # never 144: rank 0 alone asks for the restart
        try:
            cfg = load_config(self.config)
        except TelepathyError as exc:
            raise RunNotFinished(f"the run in {self.run_dir} stopped (exit {code}) and cannot be "
                                 f"requeued: {exc}") from None
        cap = min(cfg.preemption.max_restarts, LOCAL_RUNS - 1)
        cfg = dataclasses.replace(cfg, preemption=dataclasses.replace(cfg.preemption,
                                                                      max_restarts=cap))
        launched = len(self._launches(env.job_id)) > runs_before
        ending = end_allocation(cfg, RunPaths.at(self.run_dir), env.job_id, runs_before, code,
                                local_cause, launched=launched)
        if ending.decision.requeue:
            log.info("exiting with %d: submitit's local executor runs the tasks again",
                     LOCAL_RESTART)
            sys.exit(LOCAL_RESTART)
        if ending.exit_code == exits.FINISHED:
            return summary(Path(self.run_dir), env.job_id)
        raise RunNotFinished(not_requeued(self.run_dir, ending.decision.reason))


def not_requeued(run_dir: str | Path, reason: str) -> str:
    return (f"telepathy: the run in {run_dir} did not finish and the job was not requeued: "
            f"{reason}. The run directory stays resumable: fix the cause, then submit again "
            "with the same run_dir")
