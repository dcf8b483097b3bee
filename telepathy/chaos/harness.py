"""The chaos run: a reference job, then the same job with faults injected one after another.

Each fault waits until the job is ready for it (running, and a checkpoint saved since the last
recovery, so that SIGKILLs in a row are not a crash loop), then a seeded random number of steps
more. After the injection the harness waits for the detection (the event or SLURM state of
`faults.KINDS`), undoes what the fault set up (frees the disk, restores the time limit, starts
slurmd again), and waits for recovery: the first step of the next allocation, or for a full disk
the next successful save. A sampler checks all along that the run directory holds a checkpoint
that verifies (it would resume).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random
from typing import Any

import yaml

from ..checkpoint.directory import candidates, read_manifest
from ..checkpoint.hashing import verify_all
from ..config import Config, load_config
from ..core import proc
from ..core.events import Event, launches, of_kind
from ..core.jsonl import last_per_step, read_jsonl
from ..core.paths import RunPaths
from ..core.resources import job_script
from ..slurm import scontrol
from ..slurm.cluster import LocalCluster, free_port_pair
from ..slurm.jobspec import sbatch_args
from .faults import KINDS, FaultError, Injected, Target

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED")
CLOSE_RTOL = 1e-5
"""Relative tolerance for steps trained with a smaller micro-batch than the reference's (after
an out-of-memory error): the same samples, summed in another order."""


STALE_KILL_S = 90
"""After node_fail, the next fault waits this long from the node's return. slurmctld retries the
kill of the failed allocation on that node until it answers, and has been seen to deliver it
30-50 s after the node came back, into the job's next allocation there (same job id): a crash
the run survives, but one that would cut off a fault injected meanwhile before its detection."""

TIME_LIMIT_ROOM_S = 75
"""A shortened time limit's signal comes within ~65 s (SLURM checks limits every 30 s)."""


BESIDE_THE_REFERENCE = {"rank_kill", "rank_hang", "save_kill", "scancel_term", "bitflip",
                        "oom_one_rank", "time_limit", "disk_full"}
"""Fault kinds whose injection touches only the chaos job (its ranks, its files, its limit):
with only these the reference job runs beside the chaos job instead of before it."""


def harness_sets(schedule: list[str], every_steps: int = 10, step_s: float = 0.15) -> list[str]:
    """What the harness sets before the user's --set: saves often, a short hang timeout, a
    restart cap above the faults, a 30 s grace signal, and steps enough for every fault (a
    time limit's signal takes a while, and a fault after a node_fail waits out SLURM's retried
    kill: steps of ~`step_s` go on meanwhile)."""
    waits = {"time_limit": TIME_LIMIT_ROOM_S, "node_fail": STALE_KILL_S}
    room = sum(2 * every_steps + (math.ceil(waits[k] / step_s) if k in waits and
                                  (k != "node_fail" or i < len(schedule) - 1) else 0)
               for i, k in enumerate(schedule))
    return [f"checkpoint.every_steps={every_steps}", "checkpoint.every_min=0",
            "train.hang_timeout_s=45", f"preemption.max_restarts={2 * len(schedule) + 10}",
            "slurm.signal_lead_s=30", "monitor.interval_s=0",
            f"train.steps={room + 4 * every_steps}"]


@dataclass
class Options:
    config: str
    faults: int = 4
    seed: int = 0
    kinds: tuple[str, ...] = tuple(KINDS)
    gpus: int = 2
    workdir: Path = Path("runs/chaos")
    sets: tuple[str, ...] = ()
    pace_s: float = 0.1
    """Each step of both jobs is padded by this sleep (TELEPATHY_FAULT step.start sleep), so
    that the tiny model's 30 ms steps leave room for faults at random moments; no effect on
    the numbers."""
    nodes: int = 1
    """Nodes of the job, each with `gpus` ranks; above 1 the harness's own local cluster has
    that many nodes (network namespaces, root), and node_fail kills one of them."""
    last: tuple[str, ...] = ()
    """Kinds placed after every other one in each shuffled round. A short run puts node_fail
    here: the fault after a node_fail waits out SLURM's retried kill (STALE_KILL_S), and a last
    node_fail needs no such wait."""


@dataclass
class FaultRecord:
    kind: str
    t: float
    """Seconds from the start of the chaos job to the injection."""
    step: int | None
    rank: int | None
    note: str
    detect_s: float | None = None
    recover_s: float | None = None
    steps_redone: int | None = None
    resumed_from: int | None = None
    resumable: bool = True
    recovered: bool = False
    requeue_cause: str | None = None
    """What the job's requeue step said: preemption, time_limit, user, or the crash's reason."""
    error: str | None = None

    def fields(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("t", "detect_s", "recover_s"):
            if out[key] is not None:
                out[key] = round(out[key], 2)
        return out


@dataclass
class Result:
    faults: list[FaultRecord]
    summary: dict[str, Any]
    timeline: list[dict[str, Any]] = field(default_factory=list)
    """The chaos job's metrics lines: (t, step, loss, restart) for the picture."""

    def to_json(self) -> dict[str, Any]:
        return {"faults": [f.fields() for f in self.faults], "summary": self.summary}


def resumable(paths: RunPaths, ever_saved: bool) -> bool:
    """Whether a resume would find a checkpoint that verifies (before any save: trivially)."""
    for _, ckpt in candidates(paths.checkpoints):
        manifest = read_manifest(ckpt)
        if manifest is not None and not verify_all(ckpt, manifest):
            return True
    return not ever_saved


class Sampler:
    """Checks every second that the run directory would resume; remembers when it would not."""

    def __init__(self, paths: RunPaths, interval_s: float = 1.0):
        self.paths = paths
        self.interval_s = interval_s
        self.bad: list[float] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            saved = bool(of_kind(list(read_jsonl(self.paths.events)), Event.CHECKPOINT_SAVED))
            ok = resumable(self.paths, saved)
            if not ok:  # a prune or a save may be moving files: look again before counting
                time.sleep(0.3)
                ok = resumable(self.paths, saved)
            self.samples += 1
            if not ok:
                self.bad.append(time.time())

    def ok_between(self, start: float, end: float) -> bool:
        return not [t for t in self.bad if start <= t <= end]

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Harness:
    def __init__(self, opts: Options, log: Callable[[str], None] | None = None):
        self.opts = opts
        self.began = time.time()
        self.log = log or (lambda msg: print(f"chaos [{time.time() - self.began:6.1f} s] {msg}",
                                             file=sys.stderr, flush=True))
        self.work = opts.workdir.absolute()
        self.rng = Random(opts.seed)
        unknown = [k for k in opts.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(KINDS)}")
        self.schedule = self.seeded_schedule()
        if opts.nodes < 1 or opts.gpus < 1:
            raise ValueError(f"--nodes {opts.nodes} --gpus {opts.gpus}: give 1 or more of each")
        if opts.nodes > 1 and os.geteuid() != 0:
            raise ValueError(f"--nodes {opts.nodes}: a local cluster of several nodes needs root "
                             "(network namespaces); run as root, or --nodes 1")
        if opts.nodes * opts.gpus < 2 and {"rank_hang", "oom_one_rank"} & set(self.schedule):
            raise ValueError("rank_hang and oom_one_rank need 2 ranks or more (--gpus x --nodes): "
                             "a stopped rank "
                             "is noticed by another, and one rank alone retries an "
                             "out-of-memory step in place")
        if "disk_full" in self.schedule and os.geteuid() != 0:
            raise ValueError("disk_full mounts a tmpfs for the run directory and needs root; "
                             "run as root or leave disk_full out of --kinds")
        self.cfg: Config = load_config(opts.config, [*harness_sets(self.schedule,
                                                                   step_s=0.05 + opts.pace_s),
                                                     *opts.sets])
        self.cluster: LocalCluster | None = None
        self.owned = False
        self.env: dict[str, str] = {}
        self.mounted: Path | None = None
        self.jobs: list[str] = []
        """Every job the harness submitted: cancelled on the way out if still there."""
        self.target: Target | None = None
        self.node_back_at = 0.0
        """When the last node_fail's node came back (0: none yet)."""

    # -- set-up ---------------------------------------------------------------------------------
    def start_cluster(self) -> None:
        conf = os.environ.get("SLURM_CONF")
        if conf:
            self.cluster = LocalCluster.from_conf(Path(conf))
            self.env = {**os.environ}
            self.log(f"using the cluster of SLURM_CONF={conf}" +
                     ("" if self.cluster else " (not the project's: no node_fail)"))
            return
        self.cluster = LocalCluster(self.work / "slurm", free_port_pair(), grace_s=30,
                                    nodes=self.opts.nodes).up()
        self.owned = True
        self.env = self.cluster.env()
        self.log(f"local cluster up: export SLURM_CONF={self.cluster.conf}")

    def small_filesystem(self) -> Path:
        """A 128 MiB tmpfs for the chaos job's run directory, which disk_full fills."""
        mount = self.work / "fs"
        mount.mkdir(parents=True, exist_ok=True)
        proc.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mount)], timeout=30)
        self.mounted = mount
        return mount

    def submit(self, name: str, run_dir: Path, extra_env: dict[str, str] | None = None,
               pace: bool = True) -> str:
        config = self.work / "config.yaml"
        env = {**self.env, "TELEPATHY_CONFIG": str(config), "TELEPATHY_RUN_DIR": str(run_dir),
               "TELEPATHY_PYTHON": sys.executable, **(extra_env or {})}
        if self.opts.pace_s > 0 and pace:
            env["TELEPATHY_FAULT"] = f"step.start@*,sleep={self.opts.pace_s}"
        args = [*sbatch_args(self.cfg, self.opts.gpus, self.opts.nodes), f"--job-name=chaos-{name}",
                f"--output={self.work}/{name}.out", f"--error={self.work}/{name}.err"]
        job = scontrol.sbatch(str(job_script()), args, env=env, cwd=os.getcwd())
        self.jobs.append(job)
        return job

    def wait_end(self, job: str, timeout_s: float) -> tuple[str, int]:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            state, restarts = scontrol.job_state(job, env=self.env)
            if state in ENDED:
                return state, restarts
            time.sleep(1)
        return "TIMEOUT(harness)", -1

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> Result:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.start_cluster()
        try:
            return self._run()
        finally:
            self.clean_up()

    def clean_up(self) -> None:
        """Cancel what is still queued or running, then unmount and stop the own cluster."""
        for job in self.jobs:
            try:
                if scontrol.job_state(job, env=self.env)[0] not in ENDED:
                    self.log(f"cancelling job {job}")
                    scontrol.scancel(job, env=self.env)
                    self.wait_end(job, 60)
            except proc.CommandError as exc:
                self.log(f"could not cancel job {job}: {exc}")
        if self.mounted is not None:
            proc.run(["umount", "-l", str(self.mounted)], timeout=30, check=False)
        if self.owned and self.cluster is not None:
            self.cluster.down()

    def _run(self) -> Result:
        started = time.time()
        ref_dir = self.work / "reference"
        ref_job = self.submit("reference", ref_dir, {})
        self.log(f"reference job {ref_job}: {self.cfg.train.steps} steps on {self.opts.nodes} "
                 f"node(s) x {self.opts.gpus} GPU(s)")

        def reference_losses() -> dict[int, dict]:
            state, _ = self.wait_end(ref_job, 60 + 2 * self.cfg.train.steps)
            if state != "COMPLETED":
                raise RuntimeError(f"the reference job {ref_job} ended {state}; see "
                                   f"{self.work}/reference.err")
            return last_per_step(list(read_jsonl(RunPaths.at(ref_dir).metrics)))

        # Faults that touch only the chaos job's own processes and files let the reference run
        # beside it; a node's or the partition's (node_fail, preempt) wait for it to finish.
        beside = set(self.schedule) <= BESIDE_THE_REFERENCE
        reference = None if beside else reference_losses()

        fs = self.small_filesystem() if "disk_full" in self.schedule else self.work
        run_dir = fs / "run"
        fault_file = self.work / "fault-file"
        fault_file.unlink(missing_ok=True)
        job = self.submit("chaos", run_dir, {"TELEPATHY_FAULT_FILE": str(fault_file)})
        target = Target(job, RunPaths.at(run_dir), self.cfg, self.env, fault_file, self.rng,
                        self.cluster, fs / "filler" if self.mounted else None,
                        self.cfg.slurm.time_limit_min, self.log)
        self.target = target
        self.log(f"chaos job {job}: {self.opts.faults} fault(s) of {', '.join(self.opts.kinds)}, "
                 f"seed {self.opts.seed}")
        schedule = self.schedule
        records: list[FaultRecord] = []
        job_start = time.time()
        with Sampler(target.paths) as sampler:
            ready_since = 0.0
            for kind in schedule:
                record = self.one_fault(kind, target, ready_since, job_start, sampler)
                records.append(record)
                if not record.recovered:
                    break
                ready_since = time.time()
            state, restarts = self.wait_end(job, 120 + 3 * self.cfg.train.steps)
        if reference is None:
            reference = reference_losses()
        got = last_per_step(list(read_jsonl(target.paths.metrics)))
        plain = compare_losses(reference, got)
        kept = self.work / "chaos-run"  # the run's logs outlive its tmpfs
        kept.mkdir(exist_ok=True)
        for path in (target.paths.events, target.paths.metrics, target.paths.plan_carry):
            if path.exists():
                shutil.copy(path, kept / path.name)
        if target.paths.plan_carry.exists():
            # An out-of-memory error changed the micro-batch from some step on: the exact
            # reference is an uninterrupted run given the same plan.
            same = RunPaths.at(self.work / "reference-same-plan")
            same.root.mkdir(parents=True, exist_ok=True)
            shutil.copy(target.paths.plan_carry, same.plan_carry)
            ref_job = self.submit("reference-same-plan", same.root, pace=False)
            self.log(f"reference job {ref_job} with the chaos run's carried micro-batches")
            if self.wait_end(ref_job, 60 + 2 * self.cfg.train.steps)[0] != "COMPLETED":
                raise RuntimeError(f"the reference job {ref_job} failed; see "
                                   f"{self.work}/reference-same-plan.err")
            compare = compare_losses(last_per_step(list(read_jsonl(same.metrics))), got,
                                     close_allowed=False)
        else:
            compare = compare_losses(reference, got, close_allowed=False)
        finished = bool(of_kind(target.events(), Event.FINISHED))
        summary = {
            "injected": len([r for r in records if r.note]),
            "detected": len([r for r in records if r.detect_s is not None]),
            "recovered": len([r for r in records if r.recovered]),
            "requested": self.opts.faults,
            "lost_runs": 0 if state == "COMPLETED" and finished else 1,
            **compare,
            "vs_reference_without_oom": plain,
            "resumable_always": all(r.resumable for r in records) and not sampler.bad,
            "resumable_samples": sampler.samples,
            "job_id": job, "job_state": state, "restarts": restarts,
            "world_size": self.opts.nodes * self.opts.gpus, "nodes": self.opts.nodes,
            "steps": self.cfg.train.steps, "seed": self.opts.seed,
            "kinds": list(self.opts.kinds), "config": self.opts.config,
            "hang_timeout_s": self.cfg.train.hang_timeout_s,
            "wall_s": round(time.time() - started, 1),
        }
        summary["ok"] = (summary["recovered"] == summary["requested"] == summary["injected"]
                         == summary["detected"] and summary["lost_runs"] == 0 and compare["exact"]
                         and summary["resumable_always"])
        timeline = [{"t": round(r["time"] - job_start, 2), "step": r["step"], "loss": r["loss"],
                     "restart": r.get("restart")} for r in target.trained()]
        return Result(records, summary, timeline)

    def seeded_schedule(self) -> list[str]:
        """Every kind once in a shuffled round, round after round, until `faults`."""
        out: list[str] = []
        while len(out) < self.opts.faults:
            kinds = list(self.opts.kinds)
            self.rng.shuffle(kinds)
            out += sorted(kinds, key=lambda k: k in self.opts.last)  # stable: the rest shuffled
        return out[:self.opts.faults]

    def wait_ready(self, target: Target, since: float, timeout_s: float = 600) -> int | None:
        """Wait until the job runs, saved a checkpoint after `since` in its current allocation,
        and trained a seeded random number of steps more; the step then (None: it finished or
        ended first)."""
        deadline = time.time() + timeout_s
        extra = self.rng.randint(1, max(1, self.cfg.checkpoint.every_steps))
        goal = None
        quiet = self.node_back_at + STALE_KILL_S
        if time.time() < quiet:
            self.log(f"  waiting {quiet - time.time():.0f} s more for SLURM's retried kill of the "
                     "failed node's allocation")
            time.sleep(max(0.0, quiet - time.time()))
        while time.time() < deadline:
            events = target.events()
            if of_kind(events, Event.FINISHED):
                return None
            restart = launches(events) - 1
            rows = [r for r in target.trained() if r.get("restart") == restart]
            saved = [e for e in of_kind(events, Event.CHECKPOINT_SAVED)
                     if e.get("restart") == restart and e["time"] > since]
            if rows and saved and target.ranks():
                newest = rows[-1]["step"]
                goal = goal or saved[-1]["step"] + extra
                if newest >= self.cfg.train.steps - 2:
                    return None
                if newest >= goal:
                    return newest
            time.sleep(0.05)
        raise TimeoutError(f"the job did not get ready for the next fault in {timeout_s:.0f} s")

    def one_fault(self, kind_name: str, target: Target, since: float, job_start: float,
                  sampler: Sampler) -> FaultRecord:
        kind = KINDS[kind_name]
        step = self.wait_ready(target, since)
        if step is None:
            return FaultRecord(kind_name, time.time() - job_start, None, None, "",
                               error="the run reached its last steps before this fault")
        restart = launches(target.events()) - 1
        try:
            injected: Injected = kind.inject(target)
        except FaultError as exc:
            return FaultRecord(kind_name, time.time() - job_start, step, None, "", error=str(exc))
        rows = [r for r in target.trained() if r.get("time", 0) <= injected.at]
        record = FaultRecord(kind_name, injected.at - job_start,
                             injected.step if injected.step is not None else
                             (rows[-1]["step"] if rows else step), injected.rank, injected.note)
        self.log(f"{kind_name} at step {record.step}: {injected.note}")
        limit = self.cfg.train.hang_timeout_s + 180
        since = (injected.since or injected.at) - 0.01

        def detection() -> float | None:
            found = kind.detected(target, since)
            if found is None and kind.restarts and \
                    self.recovered(True, target, restart, injected.at) is not None:
                return -1.0  # it came back without a word of the fault: not detected
            return found

        detected = self.poll(detection, limit, target)
        if detected is not None and detected > 0:
            record.detect_s = max(0.0, detected - injected.at)
        if injected.after is not None:
            try:
                injected.after(target)
            except Exception as exc:  # noqa: BLE001 (recorded; the run goes on or ends below)
                record.error = f"undoing the fault failed: {type(exc).__name__}: {exc}"
                self.log(record.error)
            if kind_name == "node_fail":
                self.node_back_at = time.time()
        # Without a restart, recovery is the next save that succeeds after the detection.
        after = injected.at if kind.restarts or record.detect_s is None else \
            injected.at + record.detect_s
        recovered_at = self.wait_recovery(kind.restarts, target, restart, after, limit + 120)
        if recovered_at is not None:
            record.recover_s = recovered_at - injected.at
            record.recovered = True
            if record.detect_s is None:
                record.recovered = False
                record.error = record.error or "recovered, but the fault was never detected"
            if kind.restarts:
                events = target.events()
                begun = [e for e in of_kind(events, Event.RESUME, Event.START)
                         if e.get("restart", 0) > restart]
                resumed = begun[0]["step"] if begun else 0
                trained = [r["step"] for r in target.trained() if r.get("restart") == restart]
                record.resumed_from = resumed
                record.steps_redone = max(0, (max(trained) if trained else resumed) - resumed)
            else:
                record.steps_redone = 0
        record.resumable = sampler.ok_between(injected.at, recovered_at or time.time())
        requeues = [e for e in of_kind(target.events(), Event.REQUEUE, Event.REQUEUE_REFUSED)
                    if e["time"] >= injected.at]
        if requeues:
            record.requeue_cause = requeues[0].get("cause") or requeues[0].get("reason")
        self.log(f"  detected in {_s(record.detect_s)}, next step {_s(record.recover_s)} after the "
                 f"fault, {record.steps_redone} step(s) redone"
                 + ("" if record.recovered else "; NOT RECOVERED"))
        return record

    def poll(self, check: Callable[[], float | None], timeout_s: float,
             target: Target | None = None) -> float | None:
        """Poll `check` until it gives a time; None at the timeout, or once the run finished."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            found = check()
            if found is not None:
                return found
            if target is not None and of_kind(target.events(), Event.FINISHED):
                return check()
            time.sleep(0.2)
        return None

    def recovered(self, restarts: bool, target: Target, restart: int,
                  since: float) -> float | None:
        """When the job trained again: its next allocation's first step (or, for a fault that
        does not end the allocation, the next successful save); None: not yet."""
        if restarts:
            rows = [r for r in target.trained() if r.get("restart", 0) > restart]
            return rows[0]["time"] if rows else None
        saved = [e for e in of_kind(target.events(), Event.CHECKPOINT_SAVED) if e["time"] > since]
        return saved[0]["time"] if saved else None

    def wait_recovery(self, restarts: bool, target: Target, restart: int, since: float,
                      timeout_s: float) -> float | None:
        return self.poll(lambda: self.recovered(restarts, target, restart, since), timeout_s,
                         target)


def compare_losses(reference: dict[int, dict[str, Any]], got: dict[int, dict[str, Any]],
                   close_allowed: bool = True) -> dict[str, Any]:
    """Every step's loss against the reference: bit for bit where the micro-batch is the
    reference's, and (`close_allowed`) within CLOSE_RTOL where an out-of-memory error made it
    smaller."""
    missing = sorted(set(reference) - set(got))
    bit, close, bad, worst = 0, 0, [], 0.0
    for step in sorted(set(reference) & set(got)):
        a, b = reference[step], got[step]
        if a["loss"] == b["loss"]:
            bit += 1
            continue
        rel = abs(a["loss"] - b["loss"]) / max(abs(a["loss"]), 1e-12)
        if close_allowed and b.get("micro_batch") != a.get("micro_batch") and rel <= CLOSE_RTOL:
            close += 1
            worst = max(worst, rel)
        else:
            bad.append(step)
    return {"exact": not missing and not bad, "bit_exact_steps": bit, "close_steps": close,
            "max_rel_diff_close": worst, "differing_steps": bad[:20], "missing_steps": missing[:20]}


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"
