"""The set-up of a training process, phase by phase, each a named function.

`resume.train` runs them in order (after `inputs.check_inputs`, which needs no torch): choose the
device and the placement, start the process
group, take the run lock, open the run's logs and record the launch, start the system monitor,
find the newest valid checkpoint (and a universal copy of it for another world size), build the
data stream and the engine, load the checkpoint, and hand over to the trainer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import basemodel as base
from ..checkpoint.directory import Found
from ..checkpoint.manager import CheckpointManager
from ..checkpoint.universal import CONVERT_TIMEOUT_S, universal_checkpoint
from ..config import Config
from ..config.trajectory import trajectory_changes
from ..core.errors import ResumeRefused, RunLocked
from ..core.eventlog import EventLog
from ..core.events import Event, Stamp, is_train_row, launches, of_kind
from ..core.fsutil import write_json_atomic
from ..core.jsonl import JsonlWriter, NullWriter, read_jsonl
from ..core.paths import RunPaths
from ..core.proc import CommandError
from ..core.runlock import RunLock
from ..data.stream import generate_corpus, write_corpus
from ..engine import adapter, distributed
from ..engine.distributed import Dist
from ..plan.memory import GiB
from ..plan.model import limits
from ..plan.placement import Plan
from ..slurm import scontrol
from ..slurm.env import DistEnv, SlurmEnv
from ..watch.health import HealthLimits
from ..watch.monitor import SystemMonitor
from .watchdog import Hang, Watchdog

log = logging.getLogger("telepathy.resume")


@dataclass(frozen=True)
class Device:
    cuda: bool
    gpu_mem_gib: float | None
    """Memory of this rank's GPU; None on CPU."""


def choose_device(cfg: Config, env: DistEnv) -> Device:
    """CUDA when there is a GPU, else CPU; deterministic kernels when the config asks."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        adapter.use_cpu_accelerator()
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=cuda)
    gpu_mem = torch.cuda.get_device_properties(env.local_rank).total_memory / GiB if cuda else None
    return Device(cuda, gpu_mem)


# -- the allocation's resources ----------------------------------------------------------------
MIN_COLLECTIVE_TIMEOUT_S = 1800
"""Ranks wait in collectives while rank 0 converts a checkpoint for another world size or the
slowest rank finishes a save: a collective never gives up sooner than this."""


def collective_timeout_s(cfg: Config) -> float:
    """Every collective gives up after twice train.hang_timeout_s (at least 30 minutes): the
    backstop behind the watchdog, which fires first and says where."""
    return max(2 * cfg.train.hang_timeout_s, MIN_COLLECTIVE_TIMEOUT_S)


@contextmanager
def process_group(env: DistEnv, device: Device, timeout_s: float | None = None) -> Iterator[Dist]:
    try:
        yield distributed.start(env.rank, env.world_size, env.local_rank, env.master_addr,
                                env.master_port, device.cuda, timeout_s)
    finally:
        distributed.stop()


@contextmanager
def run_lock(dist: Dist, paths: RunPaths, job_id: str | None) -> Iterator[RunLock]:
    """Rank 0 takes the run lock; every rank learns whether it got it."""
    lock = RunLock(paths.lock, job_id)
    refused = None
    if dist.is_main:
        try:
            lock.acquire()
        except RunLocked as exc:
            refused = str(exc)
    refused = dist.broadcast_object(refused)
    if refused:
        raise RunLocked(refused)
    try:
        yield lock
    finally:
        lock.release()


@dataclass
class RunLogs:
    events: EventLog
    metrics: JsonlWriter | NullWriter
    restart: int
    """How many allocations started before this one."""


@contextmanager
def run_logs(dist: Dist, paths: RunPaths, job_id: str | None) -> Iterator[RunLogs]:
    """events.jsonl and metrics.jsonl (written by rank 0); every event stamped with this
    allocation's restart index, job id and world size. A failure is recorded as an error event."""
    restart = dist.broadcast_object(launches(list(read_jsonl(paths.events)))
                                    if dist.is_main else None)
    writer = JsonlWriter(paths.events) if dist.is_main else NullWriter()
    events = EventLog(writer, Stamp(restart, job_id, dist.world_size))
    metrics = JsonlWriter(paths.metrics) if dist.is_main else NullWriter()
    try:
        yield RunLogs(events, metrics, restart)
    except BaseException as exc:
        events.emit(Event.ERROR, error=type(exc).__name__, message=str(exc)[:2000])
        raise
    finally:
        events.close()
        metrics.close()


# -- the hang watchdog and what ranks other than 0 record ---------------------------------------
@contextmanager
def any_rank_events(paths: RunPaths, stamp: Stamp) -> Iterator[EventLog]:
    """Events from whichever rank knows them (a hang, an out-of-memory error): each one O_APPEND
    write of one line, beside rank 0's open writer (atomic on a local filesystem)."""
    writer = JsonlWriter(paths.events)
    try:
        yield EventLog(writer, stamp)
    finally:
        writer.close()


@contextmanager
def watchdog(cfg: Config, paths: RunPaths, dist: Dist,
             stamp: Callable[[], Stamp]) -> Iterator[Watchdog]:
    """The hang watchdog of this rank, from now until training ends; a hang is recorded with
    `stamp()` (the allocation's, once known)."""
    def record(hang: Hang) -> None:
        with any_rank_events(paths, stamp()) as events:
            events.emit(Event.HANG, **hang.fields())

    dog = Watchdog(cfg.train.hang_timeout_s, dist.rank, record).start()
    try:
        yield dog
    finally:
        dog.stop()


@contextmanager
def node_heartbeat(cfg: Config, paths: RunPaths, dist: Dist, env: DistEnv,
                   stamp: Callable[[], Stamp], step: Callable[[], int]) -> Iterator[Any]:
    """On a job whose ranks span several hosts (and train.node_timeout_s > 0): this rank's
    heartbeat thread (heartbeat.py), from now until training ends; a lost node is recorded with
    `stamp()`. Two collectives, on every job of more than one rank: the hosts, and rank 0's mark
    for this allocation."""
    from .heartbeat import Lost, NodeHeartbeat

    timeout_s = cfg.train.node_timeout_s
    host = socket.gethostname()
    hosts = dist.all_gather_object(host) if dist.world_size > 1 and timeout_s > 0 else [host]
    if len(set(hosts)) < 2:
        yield None
        return
    mark = dist.broadcast_object(f"{os.getpid()}-{time.time_ns()}" if dist.is_main else None)

    def record(lost: Lost) -> None:
        with any_rank_events(paths, stamp()) as events:
            events.emit(Event.NODE_LOST, **lost.fields())

    beat = NodeHeartbeat(paths.heartbeats, host, hosts, mark, beats=env.local_rank == 0,
                         timeout_s=timeout_s, rank=dist.rank, on_lost=record, step=step).start()
    log.info("heartbeat: %d nodes, a beat every %.0f s, a node silent for %g s is lost",
             len(set(hosts)), beat.interval_s, timeout_s)
    try:
        yield beat
    finally:
        beat.stop()


@dataclass(frozen=True)
class Durations:
    """What earlier allocations of this run measured, for the watchdog's allowances."""

    startup_s: float | None = None
    """The longest start-up: launch event to the first step's metrics line."""
    saves_s: tuple[float, ...] = ()
    """The last three saves' total seconds."""


STARTUP_FLOOR_S = 120.0
"""Start-up (the run lock, finding and loading the checkpoint, building the engine, the first
step) is never called hung sooner than this, whatever train.hang_timeout_s: a timeout chosen for
one-second steps must not end an allocation that loads a model from a busy shared filesystem."""


def startup_allowance_s(durations: Durations) -> float:
    """How long start-up may go without progress: twice the longest earlier start-up of the
    run, at least STARTUP_FLOOR_S (the watchdog takes the larger of this and its timeout)."""
    return max(STARTUP_FLOOR_S, 2 * (durations.startup_s or 0.0))


def measured_durations(paths: RunPaths, dist: Dist) -> Durations:
    """Collective: rank 0 reads events.jsonl and metrics.jsonl, every rank gets the figures."""
    found = None
    if dist.is_main:
        events = list(read_jsonl(paths.events))
        first_step: dict[int, float] = {}
        for row in read_jsonl(paths.metrics):
            # A training line: a resumed allocation may evaluate its first step before training.
            if is_train_row(row) and "restart" in row and "time" in row:
                first_step.setdefault(row["restart"], row["time"])
        startups = [first_step[e["restart"]] - e["time"] for e in of_kind(events, Event.LAUNCH)
                    if e.get("restart") in first_step and first_step[e["restart"]] >= e["time"]]
        saves = [e["seconds"] for e in of_kind(events, Event.CHECKPOINT_SAVED) if "seconds" in e]
        found = Durations(max(startups) if startups else None, tuple(saves[-3:]))
    return dist.broadcast_object(found)


# -- an out-of-memory error on one rank of several ------------------------------------------------
def carried_layouts(paths: RunPaths) -> list[dict[str, Any]]:
    """The micro-batches out-of-memory errors on one rank chose, each from the step where it
    struck (RunPaths.plan_carry), in step order; empty when none."""
    try:
        carries = json.loads(paths.plan_carry.read_text()).get("carries")
    except (OSError, ValueError, AttributeError):
        return []
    good = [c for c in carries or [] if isinstance(c, dict)
            and isinstance(c.get("from_step"), int) and isinstance(c.get("micro_batch"), int)]
    return sorted(good, key=lambda c: c["from_step"])


def micro_cap(carries: list[dict[str, Any]], step: int) -> int | None:
    """The micro-batch cap in force at optimizer step `step` (1-based); None: no cap."""
    caps = [c["micro_batch"] for c in carries if c["from_step"] <= step]
    return min(caps) if caps else None


def carry_smaller_layout(paths: RunPaths, dist: Dist, stamp: Callable[[], Stamp], layout: Any,
                         new: Any, step: int, exc: BaseException) -> None:
    """This rank ran out of memory at step `step` beside others: add the smaller micro-batch,
    from that step on, to the plan carried to the next allocations (written atomically), and
    record an `oom` event, from this rank. Steps before it keep the micro-batch they had, so a
    run is the same whichever allocation trains them."""
    carries = [c for c in carried_layouts(paths) if c["from_step"] != step]
    carries.append({"from_step": step, "micro_batch": new.micro_batch, "accum": new.accum,
                    "world_size": new.world_size, "global_batch": new.global_batch,
                    "rank": dist.rank, "time": time.time(),
                    "why": f"out of memory on rank {dist.rank} at step {step} with micro-batch "
                           f"{layout.micro_batch} x accum {layout.accum}"})
    write_json_atomic(paths.plan_carry, {"carries": sorted(carries, key=lambda c: c["from_step"])})
    with any_rank_events(paths, stamp()) as events:
        events.emit(Event.OOM, step=step, rank=dist.rank, micro_batch=layout.micro_batch,
                    accum=layout.accum, next_micro_batch=new.micro_batch, next_accum=new.accum,
                    error=str(exc)[:500])


def job_logs(slurm: SlurmEnv) -> dict[str, str]:
    """Where SLURM writes this job's output, for the tail tool; empty outside SLURM."""
    if not slurm.in_job:
        return {}
    try:
        job = scontrol.show_job(slurm.job_id)
    except CommandError as exc:
        log.warning("could not ask SLURM for the job's log files: %s", exc)
        return {}
    return {k.lower(): job[k] for k in ("StdOut", "StdErr") if job.get(k)}


def time_left(slurm: SlurmEnv) -> float | None:
    """Seconds until SLURM ends this job (its EndTime: the limit, or the end of a preemption's
    grace time); None outside SLURM or when unknown."""
    from datetime import datetime

    if not slurm.in_job:
        return None
    try:
        end = scontrol.show_job(slurm.job_id, timeout_s=5).get("EndTime", "")
        return (datetime.fromisoformat(end) - datetime.now()).total_seconds()
    except (CommandError, ValueError):
        return None


def record_launch(events: EventLog, dist: Dist, env: DistEnv, slurm: SlurmEnv, device: Device,
                  placement: Plan, logs: Mapping[str, str] | None = None) -> None:
    """The launch event; `logs` (stdout, stderr) where the launcher knows them (submitit),
    else SLURM's."""
    layout = placement.layout
    events.emit(Event.LAUNCH, launcher=env.launcher, slurm_restart_count=slurm.restart_count,
                device="cuda" if device.cuda else "cpu", micro_batch=layout.micro_batch,
                accum=layout.accum, global_batch=layout.global_batch, offload=placement.offload,
                plan_mem_gib=round(placement.memory.peak_gib, 2), gpu_mem_gib=device.gpu_mem_gib,
                plan_notes=list(placement.notes), pid=os.getpid(), host=socket.gethostname(),
                **((dict(logs) if logs else job_logs(slurm)) if dist.is_main else {}))
    for note in placement.notes:
        log.warning("placement: %s", note)


@contextmanager
def system_monitor(cfg: Config, env: DistEnv, paths: RunPaths) -> Iterator[SystemMonitor | None]:
    """GPU and host samples, one sampler per node (local rank 0), unless monitor.interval_s=0."""
    monitor = None
    if env.local_rank == 0 and cfg.monitor.interval_s > 0:
        limits = HealthLimits(cfg.monitor.low_util_pct, cfg.monitor.low_util_window_s,
                              cfg.monitor.high_mem_pct)
        monitor = SystemMonitor(paths.system(socket.gethostname()), paths.root,
                                cfg.monitor.interval_s, limits).start()
    try:
        yield monitor
    finally:
        if monitor is not None:
            monitor.stop()


def tracker_relay(cfg: Config, paths: RunPaths, dist: Dist, restart: int, resume_step: int,
                  job_id: str | None) -> Any:
    """Rank 0's tracker relay (track:), started once the resume point is known; None when no
    tracker is on, and on every other rank (they never import a tracker)."""
    if not (dist.is_main and cfg.track.enabled):
        return None
    from ..track.process import RelayProcess

    try:
        (paths.root / "track").mkdir(parents=True, exist_ok=True)
        relay = RelayProcess.start(paths.root, restart, resume_step, job_id, dist.world_size,
                                   cfg.track.flush_s, paths.root / "track" / "relay.log")
    except OSError as exc:  # trackers never stop training: the next allocation sends it all
        log.warning("could not start the tracker relay (%s); this allocation trains without "
                    "it, the next one (or `telepathy track sync`) sends its steps", exc)
        return None
    log.info("tracker relay pid %d: %s (its log: %s)", relay.popen.pid,
             ", ".join(cfg.track.trackers), paths.root / "track" / "relay.log")
    return relay


# -- the checkpoint to resume from -------------------------------------------------------------
def check_resumable(found: Found, cfg: Config, force: bool, data: dict | None = None) -> list[str]:
    """Refuse a resume that would change the trajectory; return the changes --force lets through.

    A different world size is not such a change: the planner keeps the global batch. A data or
    eval file whose content changed under the same path is one (the SHA-256 of its sidecar): the
    best checkpoint compares evaluations of one set.
    """
    changes = trajectory_changes(found.state["config"], cfg.to_dict())
    saved = found.state.get("data") or {}
    for what, path, before, now in (
            ("data", cfg.data.path, saved.get("sha256"), (data or {}).get("sha256")),
            ("eval", cfg.eval.path, (saved.get("eval") or {}).get("sha256"),
             ((data or {}).get("eval") or {}).get("sha256"))):
        if before and now and before != now:
            changes.append(f"{what} file content ({path}): sha256 {before[:12]}... -> "
                           f"{now[:12]}...")
    if changes and not force:
        raise ResumeRefused(
            f"the config differs from checkpoint {found.path.name} in ways that change the "
            f"training trajectory: {'; '.join(changes)}. Restore those values, or pass --force "
            "to resume anyway (the run will no longer match an uninterrupted one)")
    return changes


@dataclass
class Resumable:
    found: Found | None
    universal: Path | None
    """Its verified universal copy, when it was written by another world size."""
    verify_s: float


def newest_local(checkpoints: CheckpointManager, dist: Dist, events: EventLog) -> Found | None:
    """Collective: the newest valid checkpoint of the run directory; damaged ones are set aside
    and leftovers pruned."""
    found, rejected = checkpoints.newest_valid()
    for item in rejected:
        log.warning("skipping checkpoint %s: %s", item["checkpoint"], "; ".join(item["problems"]))
        events.emit(Event.CHECKPOINT_REJECTED, **item)
    if dist.is_main:  # no save is in flight (we hold the run lock)
        checkpoints.set_aside(rejected)
        checkpoints.prune()
    return found


MIRROR_FETCH_TIMEOUT_S = 3600.0
"""The watchdog's allowance for downloading a checkpoint from the mirror at a start."""


def from_mirror(store: Any, paths: RunPaths, dist: Dist, events: EventLog, newer_than: int,
                watchdog: Watchdog | None) -> bool:
    """Collective: rank 0 downloads the mirror's newest complete checkpoint when it is newer than
    step `newer_than` (verified as it arrives; a damaged one falls back to the previous). A
    mirror that cannot be reached is reported and the run goes on from what it has locally."""
    from ..checkpoint import mirror

    if watchdog is not None:
        watchdog.expect("start-up: looking for a newer checkpoint on the mirror",
                        MIRROR_FETCH_TIMEOUT_S)
    fetched = None
    if dist.is_main:
        try:
            fetched = mirror.fetch(store, paths, newer_than, report=events.emit)
        except Exception as exc:  # unreachable, refused: the local checkpoints stand
            log.warning("could not read the mirror %s (%s: %s); going on without it", store.url,
                        type(exc).__name__, exc)
            events.emit(Event.MIRROR_FAILED, url=store.url, error=f"{type(exc).__name__}: {exc}"
                        [:500], failures=1, failing_s=0.0, retry_in_s=0.0)
    return dist.broadcast_object(fetched) is not None


def find_checkpoint(checkpoints: CheckpointManager, cfg: Config, paths: RunPaths, dist: Dist,
                    events: EventLog, force: bool, data: dict | None = None,
                    watchdog: Watchdog | None = None, mirror: Any = None) -> Resumable:
    """Collective: the newest valid checkpoint (damaged ones set aside, leftovers pruned), or the
    mirror's (checkpoint.mirror) when it is newer, checked against the config, with a universal
    copy if the world size changed."""
    started = time.time()
    found = newest_local(checkpoints, dist, events)
    if mirror is not None and from_mirror(mirror, paths, dist, events,
                                          found.step if found else -1, watchdog):
        found = newest_local(checkpoints, dist, events)
    verify_s = time.time() - started
    if found is None:
        return Resumable(None, None, verify_s)
    changes = check_resumable(found, cfg, force, data)
    if changes:
        log.warning("resuming with --force despite changes: %s", "; ".join(changes))
        events.emit(Event.CONFIG_FORCED, changes=changes)
    universal = None
    if found.state["world_size"] != dist.world_size:
        if watchdog is not None:  # ds_to_universal runs under its own timeout
            watchdog.expect("start-up: converting the checkpoint for another world size",
                            CONVERT_TIMEOUT_S)
        universal, done = universal_checkpoint(found, paths, dist)
        log.info("checkpoint %s was written by %d ranks, this job has %d: %s universal copy %s",
                 found.path.name, found.state["world_size"], dist.world_size,
                 "using the cached" if done["cached"] else "converted to a", universal)
        events.emit(Event.WORLD_SIZE_CHANGED, step=found.step,
                    from_world_size=found.state["world_size"], to_world_size=dist.world_size,
                    **done)
    return Resumable(found, universal, verify_s)


# -- data, engine, and where to start ------------------------------------------------------------
def token_stream(cfg: Config, paths: RunPaths, dist: Dist, data: dict | None = None) -> Any:
    """The run's data: data.path (a token file, or a file of examples: rows of packed
    examples), data.module's dataset, or a synthetic corpus made once in the run directory."""
    if cfg.data.module is not None:
        from .inputs import data_module_stream

        return data_module_stream(cfg)
    path = cfg.data.path
    vocab = limits(cfg)[0]  # a pretrained model's own vocabulary, else model.vocab_size
    if path is None:
        synthetic = min(vocab, cfg.model.vocab_size)
        corpus = paths.synthetic_corpus(cfg.data.synthetic_tokens, synthetic, cfg.data.seed)
        if dist.is_main and not corpus.exists():
            write_corpus(corpus, generate_corpus(cfg.data.synthetic_tokens, synthetic,
                                                 cfg.data.seed))
        dist.barrier()
        path = corpus
    from .inputs import open_stream

    return open_stream(cfg, path, vocab, data)


def evaluator(cfg: Config, dist: Dist, micro_batch: int, faults: Any) -> Any:
    """The validation of eval.path (None when it is not set)."""
    if cfg.eval.path is None:
        return None
    from .evaluate import Evaluator
    from .inputs import file_meta, open_stream
    from .steps import objective_of

    stream = open_stream(cfg, cfg.eval.path, limits(cfg)[0], file_meta(cfg.eval.path),
                         evaluation=True)
    return Evaluator(stream, dist, micro_batch, faults, objective_of(cfg, stream))


SOURCE_STAMP = ".prepared-with-sha256"


def keep_tokenizer(data: dict | None, paths: RunPaths, dist: Dist) -> None:
    """Rank 0 keeps a copy of the tokenizer the data was prepared with (export ships it): its
    tokenizer files only (saved by transformers), made again when the data's tokenizer changed."""
    if not dist.is_main or not data or not data.get("tokenizer_dir"):
        return
    from ..data.prepare import tokenizer_digest

    source, wanted = Path(data["tokenizer_dir"]), str(data.get("tokenizer_sha256"))
    stamp = paths.tokenizer / SOURCE_STAMP
    if stamp.is_file() and stamp.read_text() == wanted:
        return
    if not source.is_dir() or str(tokenizer_digest(source)) != wanted:
        log.warning("the tokenizer %s the data was prepared with is gone or has changed since; "
                    "exports of this run carry no tokenizer", source)
        return
    from transformers import AutoTokenizer

    tmp = paths.tokenizer.with_name(".tokenizer.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoTokenizer.from_pretrained(str(source), local_files_only=True).save_pretrained(tmp)
    (tmp / SOURCE_STAMP).write_text(wanted)
    shutil.rmtree(paths.tokenizer, ignore_errors=True)
    os.replace(tmp, paths.tokenizer)


def write_effective_config(cfg: Config, paths: RunPaths, dist: Dist) -> None:
    """The config as run, and at the first start on a base model its files' checksums."""
    if dist.is_main:
        paths.config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        base.record(cfg, paths)


@dataclass(frozen=True)
class Start:
    """Where training starts: step, training time so far, data position."""

    step: int = 0
    train_time_s: float = 0.0
    samples_seen: int | None = None
    evaluated: dict | None = None
    """The checkpoint's record of its evaluations: {"eval": {"last_step"}, "best"}."""


def restore(checkpoints: CheckpointManager, engine: Any, resumable: Resumable, cfg: Config,
            events: EventLog, restart: int, parameters: int, placement: Plan, dist: Dist,
            paths: RunPaths, trainable: int | None = None) -> Start:
    """Collective: load the checkpoint into the engine, or record a new run."""
    found = resumable.found
    if found is None:
        layout = placement.layout
        trainable = parameters if trainable is None else trainable
        log.info("starting a new run in %s: %d parameters (%d trained), world %d, micro %d x "
                 "accum %d, offload %s, planned memory %.1f GiB per GPU", paths.root, parameters,
                 trainable, dist.world_size, layout.micro_batch, layout.accum, placement.offload,
                 placement.memory.peak_gib)
        events.emit(Event.START, step=0, parameters=parameters, trainable=trainable)
        return Start()
    load_started = time.time()
    checkpoints.load(engine, found, resumable.universal, cfg.train.seed)
    load_s = time.time() - load_started
    log.info("resumed from %s (step %d), restart %d; verified in %.2f s, loaded in %.2f s "
             "(%d file(s) deserialised from the bytes verification read)", found.path.name,
             found.step, restart, resumable.verify_s, load_s, checkpoints.loaded_from_memory)
    events.emit(Event.RESUME, step=found.step, checkpoint=found.path.name,
                verify_s=round(resumable.verify_s, 3), load_s=round(load_s, 3),
                files_read_once=checkpoints.loaded_from_memory)
    return Start(found.step, found.state.get("train_time_s", 0.0), found.state.get("samples_seen"),
                 {k: found.state.get(k) for k in ("eval", "best")})
