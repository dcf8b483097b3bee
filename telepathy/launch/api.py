"""`submit()`: a telepathy run launched through submitit, checked before anything is queued."""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, load_config
from ..config.loader import config_from_dict
from ..core.errors import TelepathyError
from ..core.fsutil import write_atomic
from ..core.paths import RunPaths
from ..core.resources import job_script
from ..core.runlock import RunLock
from ..plan.placement import MAX_GPUS
from ..slurm.env import DistEnv
from ..slurm.jobspec import AFTER_SRUN, RANK_ENV, JobSpec
from ..train.inputs import check_inputs
from .job import Training

log = logging.getLogger("telepathy.launch")

EXECUTORS = ("slurm", "local", "debug")
FOLDER = "submitit"
"""The submitit folder, inside the run directory: pickles, result files, every rank's logs."""


def submit(config: str | Path | Config, run_dir: str | Path, *, gpus: int | str | None = None,
           nodes: int = 1, executor: str = "slurm", overrides: Sequence[str] = (),
           force: bool = False, **slurm_params: Any) -> Any:
    """Start or resume the run in `run_dir` as a submitit job; the `submitit.Job`.

    `config`: a YAML path or a loaded Config; `overrides`: `section.key=value` as for `--set`;
    `gpus`: 1-4, "auto" (the count that finishes soonest, as `telepathy plan --slurm` decides)
    or None (slurm.gpus_per_node), per node; `nodes`: how many nodes (slurm executor), each
    running one rank per GPU (`nodes x gpus` ranks); `executor`: "slurm", "local" (no SLURM:
    this machine, with submitit's time limit and restarts) or "debug" (in this process, at
    `job.results()`);
    `slurm_params` pass through to the executor's `update_parameters`. Bad input raises a
    TelepathyError (the message `telepathy resume` would give) before anything is queued.
    `job.results()[0]` is rank 0's summary once the run has finished, after any number of
    preemptions and requeues.
    """
    if executor not in EXECUTORS:
        raise TelepathyError(f"executor={executor!r}: choose one of {', '.join(EXECUTORS)}")
    cfg = _config(config, overrides)
    run_dir = Path(run_dir).absolute()
    nodes = choose_nodes(nodes, executor, gpus)
    count = choose_gpus(cfg, gpus, run_dir, executor)
    check_inputs(cfg, DistEnv(0, nodes * count, 0, "127.0.0.1", None, f"submitit-{executor}"))
    paths = RunPaths.at(run_dir)
    _not_in_use(paths)
    paths.submitted_config.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(paths.submitted_config, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    folder = run_dir / FOLDER
    from . import adapter

    ex = adapter.executor(executor, folder)
    if executor == "slurm":
        ex.update_parameters(**slurm_parameters(cfg, count, paths, folder, slurm_params, nodes))
    elif executor == "local":
        ex.update_parameters(**local_parameters(cfg, count, slurm_params))
    training = Training(str(paths.submitted_config), str(run_dir), force)
    with adapter.clean_environment():
        job = ex.submit(training)
    log.info("submitted %s job %s on %d node(s) x %d GPU(s) for %s; submitit folder %s",
             executor, job.job_id, nodes, count, run_dir, folder)
    return job


def _config(config: str | Path | Config, overrides: Sequence[str]) -> Config:
    if isinstance(config, Config):
        return config_from_dict(config.to_dict(), list(overrides))
    if not isinstance(config, (str, Path)):
        raise TelepathyError(f"config={config!r}: pass a YAML path or a telepathy Config")
    return load_config(config, list(overrides))


def choose_nodes(nodes: Any, executor: str, gpus: Any) -> int:
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise TelepathyError(f"nodes={nodes!r}: give a whole number of nodes, 1 or more "
                             "(a min-max range such as 1-2: sbatch --nodes=1-2 "
                             "slurm/preemptible.slurm)")
    if nodes > 1 and executor != "slurm":
        raise TelepathyError(f"nodes={nodes} with executor={executor!r}: the {executor} executor "
                             "runs on this machine alone; use executor='slurm', or nodes=1")
    if nodes > 1 and gpus == "auto":
        raise TelepathyError(f"gpus='auto' with nodes={nodes}: 'auto' weighs the GPU counts of "
                             "one node; give gpus=1-4 per node (telepathy plan --slurm --nodes "
                             f"{nodes} shows the options)")
    return nodes


def choose_gpus(cfg: Config, gpus: int | str | None, run_dir: Path, executor: str) -> int:
    if executor == "debug":
        if gpus not in (None, 1, "auto"):
            raise TelepathyError(f"gpus={gpus!r} with executor='debug': the debug executor runs "
                                 "one rank in this process; use gpus=1, or executor='local'")
        gpus = 1
    if gpus is None:
        return cfg.slurm.gpus_per_node
    if gpus == "auto":
        return _auto(cfg, run_dir, executor)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= MAX_GPUS:
        raise TelepathyError(f"gpus={gpus!r}: use 1-{MAX_GPUS} (one node, one rank per GPU) "
                             "or 'auto'")
    return gpus


def _auto(cfg: Config, run_dir: Path, executor: str) -> int:
    """The count that finishes soonest: `telepathy plan --slurm`'s choice."""
    from ..plan.cli import options, remaining_steps, wait_for
    from ..plan.gpucount import recommend

    opts = options(cfg, run_dir, cfg.placement.gpu_mem_gib)
    if executor == "slurm":
        env = {**os.environ, "TELEPATHY_PYTHON": sys.executable}
        for i, o in enumerate(opts):
            if o.plan is not None:
                wait, why = wait_for(cfg, o.gpus, str(job_script()), [], env)
                opts[i] = dataclasses.replace(o, error=why, wait_s=wait)
    else:
        opts = [dataclasses.replace(o, wait_s=0.0) for o in opts]
    best = recommend(opts, remaining_steps(cfg, run_dir))
    if best is None:
        raise TelepathyError("gpus='auto': no count of 1-4 GPUs can run this config now: " +
                             "; ".join(f"{o.gpus}: {o.error}" for o in opts if o.error))
    log.info("gpus='auto': %d GPU(s) finish soonest", best.gpus)
    return best.gpus


def _not_in_use(paths: RunPaths) -> None:
    """Refuse a run directory that a live job holds (its run lock)."""
    if not paths.lock.exists():
        return
    lock = RunLock(paths.lock, None)
    lock.acquire()  # raises RunLocked naming the holder
    lock.release()


def _shell_lines(cfg_path: Path, run_dir: Path) -> list[str]:
    return [f"TELEPATHY_PYTHON={shlex.quote(sys.executable)}",
            f"CONFIG={shlex.quote(str(cfg_path))}", f"RUN_DIR={shlex.quote(str(run_dir))}"]


def slurm_parameters(cfg: Config, gpus: int, paths: RunPaths, folder: Path,
                     extra: dict[str, Any], nodes: int = 1) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters: what slurm/preemptible.slurm asks for, from the same
    config fields (JobSpec), its batch-shell lines, and the requeue step after srun; `gpus`
    ranks on each of `nodes` nodes."""
    spec = JobSpec.of(cfg, gpus, nodes)
    extra = dict(extra)
    teardown = (f'exec "$TELEPATHY_PYTHON" -m telepathy.launch.teardown --config "$CONFIG" '
                f'--run-dir "$RUN_DIR" --folder {shlex.quote(str(folder))} --tasks {nodes * gpus} '
                '--exit-code "$status"')
    return {"job_name": "telepathy", "nodes": nodes, "ntasks_per_node": gpus,
            "gpus_per_node": spec.gres, "partition": spec.partition, "time": spec.time_min,
            "mem_per_gpu": f"{spec.mem_per_gpu_gb}G",
            "setup": [*extra.pop("setup", []), *_shell_lines(paths.submitted_config, paths.root),
                      *RANK_ENV.splitlines()],
            "srun_args": ["--kill-on-bad-exit=1", f"--cpus-per-task={spec.cpus_per_gpu}",
                          *extra.pop("srun_args", [])],
            "teardown": [*AFTER_SRUN.splitlines(), teardown],
            "additional_parameters": {"cpus-per-gpu": spec.cpus_per_gpu,
                                      "signal": spec.grace_signal, "requeue": True,
                                      **extra.pop("additional_parameters", {})},
            **extra}


def local_parameters(cfg: Config, gpus: int, extra: dict[str, Any]) -> dict[str, Any]:
    """submitit's LocalExecutor parameters: one task per GPU, the config's time limit, its grace
    signal (submitit's SIGUSR2) signal_lead_s before it, one rendezvous port for every restart."""
    extra = dict(extra)
    threads = max(1, (os.cpu_count() or 1) // gpus)
    setup = [*extra.pop("setup", []), "export MASTER_ADDR=127.0.0.1",
             f"export MASTER_PORT={_free_port()}",
             f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}"]
    return {"tasks_per_node": gpus, "gpus_per_node": gpus, "nodes": 1,
            "timeout_min": cfg.slurm.time_limit_min, "signal_delay_s": cfg.slurm.signal_lead_s,
            "setup": setup, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
