"""SLURM commands telepathy calls (through proc, with timeouts)."""

from __future__ import annotations

from ..core import proc


def show_job(job_id: str, timeout_s: float = 15, env: dict[str, str] | None = None) -> dict[str, str]:
    """`scontrol show job -o ID` as a dict of its Key=Value fields."""
    out = proc.run(["scontrol", "show", "job", "-o", job_id], timeout=timeout_s, env=env).stdout
    fields: dict[str, str] = {}
    for token in out.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def requeue(job_id: str, timeout_s: float) -> None:
    proc.run(["scontrol", "requeue", job_id], timeout=timeout_s)


def sbatch(script: str | None, args: list[str] = (), env: dict[str, str] | None = None,
           timeout_s: float = 30, cwd: str | None = None) -> str:
    """Submit a batch script, or `--wrap` in args with script None; return the job id.

    `cwd` becomes the job's submit directory.
    """
    cmd = ["sbatch", "--parsable", *args, *([script] if script else [])]
    out = proc.run(cmd, timeout=timeout_s, env=env, cwd=cwd).stdout
    return out.strip().split(";")[0]


def scancel(job_id: str, signal: str | None = None, env: dict[str, str] | None = None,
            timeout_s: float = 30) -> None:
    cmd = ["scancel", *([f"--signal={signal}"] if signal else []), job_id]
    proc.run(cmd, timeout=timeout_s, env=env)


def job_state(job_id: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    """(JobState, Restarts) of a job."""
    fields = show_job(job_id, env=env)
    return fields.get("JobState", "UNKNOWN"), int(fields.get("Restarts", "0"))


def sacct(job_ids: list[str], timeout_s: float = 30) -> str:
    """`sacct -o JobID,State,NodeList --parsable2` for these jobs (raises CommandError on a
    cluster without accounting storage: "Slurm accounting storage is disabled")."""
    cmd = ["sacct", "-o", "JobID,State,NodeList", "--parsable2"]
    for job_id in job_ids:
        cmd += ["-j", job_id]
    return proc.run(cmd, timeout=timeout_s).stdout
