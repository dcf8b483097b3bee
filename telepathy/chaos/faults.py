"""The fault kinds of the chaos harness: how each is injected into a running job, and which
event of the run directory (or which SLURM state) shows that it was detected.

Every fault is real: signals to real processes, bytes flipped in real files, a real filesystem
filled, the node's real `slurmd` killed. Two go through the training process's own fault points
(`TELEPATHY_FAULT_FILE`, telepathy.testing.faults): `save_kill`, because a save of the tiny model
lasts milliseconds and must be hit from inside, and `oom_one_rank`, a fake of a GPU running out
of memory (it raises torch.OutOfMemoryError as CUDA does) since this machine has no GPU.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

import psutil

from ..checkpoint.directory import candidates, read_manifest
from ..config import Config
from ..core import proc
from ..core.events import Event, is_train_row
from ..core.jsonl import read_jsonl
from ..core.paths import RunPaths
from ..slurm import scontrol
from ..slurm.cluster import LocalCluster


class FaultError(RuntimeError):
    """A fault could not be injected (the job is not where the fault needs it)."""


@dataclass
class Target:
    """The job under test and what the faults need to reach it."""

    job_id: str
    paths: RunPaths
    cfg: Config
    env: dict[str, str]
    """Environment in which SLURM commands reach the cluster."""
    fault_file: Path
    rng: Random
    cluster: LocalCluster | None = None
    """The local cluster, when the harness may stop and restart its slurmd (node_fail)."""
    filler: Path | None = None
    """Where disk_full writes its filler: on the run directory's (small) filesystem."""
    time_limit_min: int = 0
    log: Callable[[str], None] = print

    def events(self) -> list[dict[str, Any]]:
        return list(read_jsonl(self.paths.events))

    def trained(self) -> list[dict[str, Any]]:
        """The training lines of the job's metrics.jsonl, in order (evaluation lines left out)."""
        return [r for r in read_jsonl(self.paths.metrics) if is_train_row(r)]

    def ranks(self) -> dict[int, psutil.Process]:
        """The job's training processes by rank: the tasks of step 0 of the current allocation,
        children of its step daemon (not the `srun` in the batch shell, whose command line and
        environment look alike)."""
        found: dict[int, psutil.Process] = {}
        conf = self.env.get("SLURM_CONF")
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "telepathy.resume" not in cmd:
                continue
            try:
                env = p.environ()
                parent = p.parent()
                if parent is None or not " ".join(parent.cmdline()).startswith(
                        f"slurmstepd: [{self.job_id}."):
                    continue
            except psutil.Error:
                continue
            if env.get("SLURM_JOB_ID") == self.job_id and env.get("SLURM_CONF") == conf \
                    and env.get("SLURM_STEP_ID") == "0" and "SLURM_PROCID" in env:
                found[int(env["SLURM_PROCID"])] = p
        return found

    def rank(self) -> tuple[int, psutil.Process]:
        ranks = self.ranks()
        if not ranks:
            raise FaultError(f"no training process of job {self.job_id} is running")
        r = self.rng.choice(sorted(ranks))
        return r, ranks[r]

    def world_size(self) -> int:
        return len(self.ranks()) or 1


@dataclass
class Injected:
    """What an injection did: when, on which rank, and a few words."""

    at: float
    rank: int | None = None
    note: str = ""
    step: int | None = None
    """The step the job had reached (None: the newest metrics line)."""
    after: Callable[[Target], None] | None = None
    """Undo what the fault set up, once it is detected (free the disk, restore the limit)."""
    since: float | None = None
    """The earliest moment a detection counts (armed faults: when armed); None: `at`."""


@dataclass(frozen=True)
class Kind:
    name: str
    inject: Callable[[Target], Injected]
    detected: Callable[[Target, float], float | None]
    """When the job (or SLURM) noticed the fault injected at the given time; None: not yet."""
    restarts: bool = True
    """Whether the job leaves its allocation (else recovery is the next successful save)."""


# -- how detection shows ---------------------------------------------------------------------------
def event_after(*kinds: Event) -> Callable[[Target, float], float | None]:
    def detected(target: Target, since: float) -> float | None:
        for e in target.events():
            if e.get("event") in kinds and e.get("time", 0) >= since:
                return e["time"]
        return None
    return detected


allocation_left = event_after(Event.ALLOCATION_END, Event.HANG, Event.OOM)
"""The allocation ended: the requeue step recorded it (or a rank said why it left)."""


# -- the injections --------------------------------------------------------------------------------
def rank_kill(target: Target) -> Injected:
    rank, p = target.rank()
    at = time.time()
    p.send_signal(signal.SIGKILL)
    return Injected(at, rank, f"SIGKILL pid {p.pid}")


def rank_hang(target: Target) -> Injected:
    rank, p = target.rank()
    at = time.time()
    p.send_signal(signal.SIGSTOP)
    return Injected(at, rank, f"SIGSTOP pid {p.pid}")


def _arm(target: Target, spec: str, timeout_s: float) -> tuple[float, float]:
    """Arm a fault point in the job's processes; wait until a rank fired it (the file is
    consumed). Returns when it was armed and when it was seen consumed."""
    armed = time.time()
    tmp = target.fault_file.with_suffix(".tmp")
    tmp.write_text(spec + "\n")
    os.replace(tmp, target.fault_file)
    deadline = time.time() + timeout_s
    while target.fault_file.exists():
        if time.time() > deadline:
            target.fault_file.unlink(missing_ok=True)
            raise FaultError(f"fault point {spec!r} was not reached in {timeout_s:.0f} s")
        time.sleep(0.01)
    return armed, time.time()


def save_kill(target: Target) -> Injected:
    rank = target.rng.randrange(target.world_size())
    armed, at = _arm(target, f"save.file_written@*:{rank}", timeout_s=300)
    started = [e for e in target.events() if e.get("event") == Event.CHECKPOINT_STARTED]
    step = started[-1]["step"] if started else None
    return Injected(at, rank, f"SIGKILL inside the save of step {step}", step=step, since=armed)


def oom_one_rank(target: Target) -> Injected:
    rank = target.rng.randrange(target.world_size())
    armed, at = _arm(target, f"step.oom@*:{rank}", timeout_s=120)
    return Injected(at, rank, "torch.OutOfMemoryError inside a step (a fake of a GPU's)",
                    since=armed)


def preempt(target: Target) -> Injected:
    gpus = target.cfg.slurm.gpu_type
    at = time.time()
    job = scontrol.sbatch(None, ["--partition=high", f"--gpus-per-node={gpus}:4", "--time=1",
                                 "--job-name=chaos-preemptor", "--output=/dev/null",
                                 "--wrap=sleep 2"], env=target.env)
    return Injected(at, None, f"high-partition job {job} takes all 4 GPUs")


def scancel_term(target: Target) -> Injected:
    at = time.time()
    scontrol.scancel(target.job_id, signal="TERM", env=target.env)
    return Injected(at, None, "scancel -s TERM")


def _seconds(value: str) -> int:
    days, _, hms = value.rpartition("-")
    parts = [int(x) for x in hms.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def time_limit(target: Target) -> Injected:
    job = scontrol.show_job(target.job_id, env=target.env)
    elapsed = _seconds(job.get("RunTime", "0:0"))
    lead = target.cfg.slurm.signal_lead_s
    minutes = math.ceil((elapsed + lead + 5) / 60)
    at = time.time()
    proc.run(["scontrol", "update", f"JobId={target.job_id}", f"TimeLimit={minutes}"],
             timeout=30, env=target.env)

    def restore(t: Target) -> None:
        # After the requeue step, which tells the cause from the limit (EndTime), ran.
        deadline = time.time() + 120
        while time.time() < deadline and event_after(Event.ALLOCATION_END)(t, at) is None:
            time.sleep(0.2)
        proc.run(["scontrol", "update", f"JobId={t.job_id}", f"TimeLimit={t.time_limit_min}"],
                 timeout=30, env=t.env)

    return Injected(at, None, f"TimeLimit {minutes} min after {elapsed} s (signal "
                              f"{lead} s before it)", after=restore)


def bitflip(target: Target) -> Injected:
    """SIGKILL a rank, and once the job's ranks are gone, flip one byte of the newest complete
    checkpoint: the next allocation must find it damaged and fall back to the one before."""
    deadline = time.time() + 300
    while len(_complete(target)) < 2:  # an older one to fall back to
        if time.time() > deadline:
            raise FaultError("fewer than 2 complete checkpoints after 300 s")
        time.sleep(0.2)
    rank, p = target.rank()
    at = time.time()
    p.send_signal(signal.SIGKILL)
    deadline = time.time() + 60
    while target.ranks():
        if time.time() > deadline:
            raise FaultError("the job's ranks were still running 60 s after one was killed")
        time.sleep(0.1)
    ckpt = _complete(target)[0]
    name = target.rng.choice(sorted(read_manifest(ckpt)["files"]))
    path = ckpt / name
    offset = target.rng.randrange(path.stat().st_size)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    return Injected(at, rank, f"SIGKILL, then byte {offset} of {ckpt.name}/{name} flipped")


def _complete(target: Target) -> list[Path]:
    """The complete checkpoints, newest first."""
    return [c for _, c in candidates(target.paths.checkpoints) if read_manifest(c) is not None]


def disk_full(target: Target) -> Injected:
    if target.filler is None:
        raise FaultError("disk_full needs the run directory on a filesystem the harness may fill")
    free = shutil.disk_usage(target.filler.parent).free
    keep = 1 << 20  # the logs go on; a checkpoint does not fit
    at = time.time()
    with open(target.filler, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        left = max(0, free - keep)
        while left > 0:
            try:
                left -= f.write(chunk[:min(len(chunk), left)])
            except OSError:
                break

    def free_it(t: Target) -> None:
        t.filler.unlink(missing_ok=True)

    return Injected(at, None, f"filled {free / 2**20:.0f} MiB, 1 MiB left", after=free_it)


def node_fail(target: Target) -> Injected:
    """Kill a node's slurmd and every process of the job on it (its step daemons, batch shell
    and ranks) with SIGKILL; once SLURM marks the node down, start slurmd again. On a cluster
    of several nodes: one of the job's nodes, every process on it."""
    cluster = target.cluster
    if cluster is None:
        raise FaultError("node_fail needs the project's local cluster (its slurmd is restarted)")
    if cluster.nodes > 1:
        return _fail_one_of_the_nodes(target, cluster)
    victims = [psutil.Process(int((cluster.state_dir / "slurmd.pid").read_text()))]
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith(f"slurmstepd: [{target.job_id}."):
            try:
                kids = p.children(recursive=True)
                if any(k.environ().get("SLURM_CONF") == target.env.get("SLURM_CONF")
                       for k in kids):
                    victims += [p, *kids]
            except psutil.Error:
                continue
    at = time.time()
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass

    def node_back(t: Target) -> None:
        cluster.up()

    return Injected(at, None, f"slurmd and {len(victims) - 1} processes of the job killed",
                    after=node_back)


def _fail_one_of_the_nodes(target: Target, cluster: LocalCluster) -> Injected:
    try:
        nodelist = scontrol.show_job(target.job_id, env=target.env).get("NodeList", "")
        nodes = proc.run(["scontrol", "show", "hostnames", nodelist], timeout=30,
                         env=target.env).stdout.split()
    except proc.CommandError as exc:
        raise FaultError(f"could not find the nodes of job {target.job_id}: {exc}") from None
    if not nodes:
        raise FaultError(f"job {target.job_id} holds no node now (NodeList={nodelist!r})")
    node = target.rng.choice(nodes)
    ranks = {r for r, p in target.ranks().items() if cluster.on_node(node, p.pid)}
    at = time.time()
    try:
        killed = cluster.fail_node(node)
    except proc.CommandError as exc:
        raise FaultError(f"could not kill node {node}: {exc}") from None

    def node_back(t: Target) -> None:
        cluster.up()

    return Injected(at, min(ranks) if ranks else None,
                    f"node {node} of {nodelist}: {killed} processes killed, its slurmd first "
                    f"(rank(s) {sorted(ranks)})", after=node_back)


def node_down(target: Target, since: float) -> float | None:
    out = proc.run(["sinfo", "-h", "-N", "-o", "%T"], timeout=30, env=target.env).stdout
    return time.time() if "down" in out else None


KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("rank_kill", rank_kill, allocation_left),
    Kind("rank_hang", rank_hang, event_after(Event.HANG)),
    Kind("save_kill", save_kill, allocation_left),
    Kind("preempt", preempt, event_after(Event.SIGNAL)),
    Kind("scancel_term", scancel_term, event_after(Event.SIGNAL)),
    Kind("time_limit", time_limit, event_after(Event.SIGNAL)),
    Kind("bitflip", bitflip, event_after(Event.CHECKPOINT_REJECTED)),
    Kind("disk_full", disk_full, event_after(Event.CHECKPOINT_SKIPPED, Event.CHECKPOINT_FAILED),
         restarts=False),  # needs root: the run directory is on a tmpfs it mounts
    Kind("node_fail", node_fail, node_down),  # needs the project's local cluster
    # (At the smallest micro-batch the error is a plain crash: no `oom`, the allocation ends.)
    Kind("oom_one_rank", oom_one_rank, event_after(Event.OOM, Event.ALLOCATION_END)),
]}
