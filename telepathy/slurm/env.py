"""A frozen, typed view of the launch environment, read once from a mapping.

Pure: callers pass `os.environ` (or a dict in tests); nothing here writes the environment.
Precedence: torchrun's variables (RANK/WORLD_SIZE), then srun's (SLURM_PROCID with
SLURM_STEP_NUM_TASKS), then submitit's local executor's (SUBMITIT_LOCAL_GLOBALID with
SUBMITIT_LOCAL_NTASKS), else a single process. Under submitit (SUBMITIT_EXECUTOR set) the launcher
is named `submitit-<executor>`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int | None
    """None: a single process that picks a free port itself."""
    launcher: str
    """'torchrun', 'srun', 'submitit-slurm', 'submitit-local' or 'single'."""
    job_id: str | None = None
    """The job's id outside SLURM: `local-<controller pid>` under submitit's local executor."""

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> DistEnv:
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                       local_rank=int(env.get("LOCAL_RANK", "0")),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None,
                       launcher="torchrun")
        if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
            job_id = int(env.get("SLURM_JOB_ID", "0"))
            port = env.get("MASTER_PORT")
            return cls(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_STEP_NUM_TASKS"]),
                       local_rank=int(env.get("SLURM_LOCALID", "0")),
                       master_addr=env.get("MASTER_ADDR")
                       or first_host(env.get("SLURM_STEP_NODELIST", "127.0.0.1")),
                       master_port=int(port) if port else 20000 + job_id % 20000,
                       launcher="submitit-slurm" if env.get("SUBMITIT_EXECUTOR") == "slurm"
                       else "srun")
        if "SUBMITIT_LOCAL_GLOBALID" in env and "SUBMITIT_LOCAL_NTASKS" in env:
            port = env.get("MASTER_PORT")
            return cls(rank=int(env["SUBMITIT_LOCAL_GLOBALID"]),
                       world_size=int(env["SUBMITIT_LOCAL_NTASKS"]),
                       local_rank=int(env.get("SUBMITIT_LOCAL_LOCALID", "0")),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(port) if port else None, launcher="submitit-local",
                       job_id=f"local-{env['SUBMITIT_LOCAL_JOB_ID']}"
                       if env.get("SUBMITIT_LOCAL_JOB_ID") else None)
        return cls(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=None,
                   launcher="single")


@dataclass(frozen=True)
class SlurmEnv:
    """What SLURM tells a job about itself; every field None outside SLURM."""

    job_id: str | None
    job_name: str | None
    restart_count: int
    partition: str | None
    nodelist: str | None
    gpus_on_node: int | None

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> SlurmEnv:
        array = env.get("SLURM_ARRAY_JOB_ID")
        job_id = f"{array}_{env['SLURM_ARRAY_TASK_ID']}" if array else env.get("SLURM_JOB_ID")
        gpus = env.get("SLURM_GPUS_ON_NODE")
        return cls(job_id=job_id, job_name=env.get("SLURM_JOB_NAME"),
                   restart_count=int(env.get("SLURM_RESTART_COUNT", "0")),
                   partition=env.get("SLURM_JOB_PARTITION"), nodelist=env.get("SLURM_JOB_NODELIST"),
                   gpus_on_node=int(gpus) if gpus else None)

    @property
    def in_job(self) -> bool:
        return self.job_id is not None
