"""`python -m telepathy.resume`: start a run, or resume it from its newest valid checkpoint.

The same command does both, as one process (world size 1), under `torchrun`, or under `srun`.
Exit status: 0 finished, `preemption.exit_code` (75) saved and ready to requeue, 2 bad input,
1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from . import logs, slurmctl
from .config import Config, PreemptionConfig, load_config, trajectory_changes
from .envinfo import DistEnv, SlurmEnv
from .errors import ResumeRefused, RunLocked, TelepathyError
from .faults import FaultPlan
from .health import HealthLimits
from .jsonl import JsonlWriter, NullWriter, read_jsonl
from .monitor import SystemMonitor
from .paths import RunPaths
from .proc import CommandError
from .runlock import RunLock
from .signals import PreemptionFlag

log = logging.getLogger("telepathy.resume")

BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m telepathy.resume", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny-cpu.yaml")
    p.add_argument("--run-dir", required=True, help="run directory (created if missing)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.steps=200")
    p.add_argument("--force", action="store_true",
                   help="resume even if the config changes the training trajectory")
    return p.parse_args(argv)


def check_inputs(cfg: Config, env: DistEnv) -> None:
    """Everything that can be checked before any distributed or GPU work."""
    from .data import open_tokens

    if cfg.data.path is not None:
        open_tokens(cfg.data.path, cfg.data.dtype)
    if cfg.model.pretrained_path and not (Path(cfg.model.pretrained_path) / "config.json").is_file():
        raise TelepathyError(f"model.pretrained_path={cfg.model.pretrained_path!r} has no "
                             "config.json; point it at a local Hugging Face model directory")
    make_plan(cfg, env, gpu_mem_gib=None)


def make_plan(cfg: Config, env: DistEnv, gpu_mem_gib: float | None):
    """The placement of this run on `env.world_size` ranks (memory unchecked when None)."""
    import json

    from .placement import plan, request_for

    hf_config = None
    if cfg.model.pretrained_path:
        hf_config = json.loads((Path(cfg.model.pretrained_path) / "config.json").read_text())
    return plan(request_for(cfg, env.world_size, gpu_mem_gib, hf_config))


def _init_process_group(env: DistEnv, cuda: bool):
    """Set the variables DeepSpeed reads, then start the process group."""
    import torch

    from .distributed import Dist, free_port

    os.environ.update(MASTER_ADDR=env.master_addr, RANK=str(env.rank),
                      WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_PORT=str(env.master_port or free_port()))
    import deepspeed

    # A shared-memory collective that JIT-compiles for ~46 s and changes nothing for gloo.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    return Dist(env.rank, env.world_size, device)


def _stream(cfg: Config, paths: RunPaths, dist) -> Any:
    from .data import TokenStream, generate_corpus, open_tokens, write_corpus

    path = cfg.data.path
    if path is None:
        corpus = paths.synthetic_corpus(cfg.data.synthetic_tokens, cfg.model.vocab_size,
                                        cfg.data.seed)
        if dist.is_main and not corpus.exists():
            write_corpus(corpus, generate_corpus(cfg.data.synthetic_tokens, cfg.model.vocab_size,
                                                 cfg.data.seed))
        dist.barrier()
        path = corpus
    return TokenStream(open_tokens(path, cfg.data.dtype), cfg.data.seq_len, cfg.data.seed,
                       cfg.model.vocab_size)


def _job_logs(slurm: SlurmEnv) -> dict[str, str]:
    """Where SLURM writes this job's output, for the tail tool; empty outside SLURM."""
    if not slurm.in_job:
        return {}
    try:
        job = slurmctl.show_job(slurm.job_id)
    except CommandError as exc:
        log.warning("could not ask SLURM for the job's log files: %s", exc)
        return {}
    return {k.lower(): job[k] for k in ("StdOut", "StdErr") if job.get(k)}


def _time_left(slurm: SlurmEnv) -> float | None:
    """Seconds until SLURM ends this job (its EndTime: the limit, or the end of a preemption's
    grace time); None outside SLURM or when unknown."""
    from datetime import datetime

    if not slurm.in_job:
        return None
    try:
        end = slurmctl.show_job(slurm.job_id, timeout_s=5).get("EndTime", "")
        return (datetime.fromisoformat(end) - datetime.now()).total_seconds()
    except (CommandError, ValueError):
        return None


def _count_launches(paths: RunPaths) -> int:
    return sum(1 for e in read_jsonl(paths.events) if e.get("event") == "launch")


def _lock_run(dist, paths: RunPaths, slurm: SlurmEnv) -> RunLock:
    """Rank 0 takes the run lock; every rank learns whether it got it."""
    import torch.distributed

    lock = RunLock(paths.lock, slurm.job_id)
    refused = None
    if dist.is_main:
        try:
            lock.acquire()
        except RunLocked as exc:
            refused = str(exc)
    refused = dist.broadcast_object(refused)
    if refused:
        torch.distributed.destroy_process_group()
        raise RunLocked(refused)
    return lock


def _check_resumable(found, cfg: Config, force: bool) -> list[str]:
    """Refuse a resume that would change the trajectory; return the changes --force lets through.

    A different world size is not such a change: the planner keeps the global batch.
    """
    changes = trajectory_changes(found.state["config"], cfg.to_dict())
    if changes and not force:
        raise ResumeRefused(
            f"the config differs from checkpoint {found.path.name} in ways that change the "
            f"training trajectory: {'; '.join(changes)}. Restore those values, or pass --force "
            "to resume anyway (the run will no longer match an uninterrupted one)")
    return changes


def _newest_checkpoint(checkpoints, dist, events, base: dict[str, Any]):
    """Verify checkpoints newest first; log and set aside the bad ones; tidy up after crashes."""
    started = time.time()
    found, rejected = checkpoints.newest_valid()
    for item in rejected:
        log.warning("skipping checkpoint %s: %s", item["checkpoint"], "; ".join(item["problems"]))
        events.write({"event": "checkpoint_rejected", **base, **item})
    if dist.is_main:  # no save is in flight (we hold the run lock)
        checkpoints.set_aside(rejected)
        checkpoints.prune()
    return found, time.time() - started


def train(cfg: Config, paths: RunPaths, env: DistEnv, slurm: SlurmEnv, flag: PreemptionFlag,
          force: bool, faults: FaultPlan) -> int:
    import torch
    import torch.distributed

    from . import rng, statedump
    from .checkpoint import CheckpointManager
    from .elastic import universal_checkpoint
    from .engine import build_engine, count_parameters
    from .memory import GiB
    from .trainer import RunInfo, Trainer

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=cuda)
    gpu_mem = torch.cuda.get_device_properties(env.local_rank).total_memory / GiB if cuda else None
    plan = make_plan(cfg, env, gpu_mem)
    layout = plan.layout
    dist = _init_process_group(env, cuda)
    logs.set_rank(dist.rank)
    lock = _lock_run(dist, paths, slurm)
    events = JsonlWriter(paths.events) if dist.is_main else NullWriter()
    metrics = JsonlWriter(paths.metrics) if dist.is_main else NullWriter()
    monitor = None
    try:
        restart = dist.broadcast_object(_count_launches(paths) if dist.is_main else None)
        info = RunInfo(restart=restart, job_id=slurm.job_id, launched_at=time.time())
        base = {"time": info.launched_at, "restart": restart, "job_id": slurm.job_id}
        events.write({"event": "launch", **base, "world_size": dist.world_size,
                      "launcher": env.launcher, "slurm_restart_count": slurm.restart_count,
                      "device": "cuda" if cuda else "cpu", "micro_batch": layout.micro_batch,
                      "accum": layout.accum, "global_batch": layout.global_batch,
                      "offload": plan.offload, "plan_mem_gib": round(plan.memory.peak_gib, 2),
                      "gpu_mem_gib": gpu_mem, "plan_notes": list(plan.notes),
                      "pid": os.getpid(), "host": socket.gethostname(),
                      **(_job_logs(slurm) if dist.is_main else {})})
        if env.local_rank == 0 and cfg.monitor.interval_s > 0:
            limits = HealthLimits(cfg.monitor.low_util_pct, cfg.monitor.low_util_window_s,
                                  cfg.monitor.high_mem_pct)
            monitor = SystemMonitor(paths.system(socket.gethostname()), paths.root,
                                    cfg.monitor.interval_s, limits).start()
        checkpoints = CheckpointManager(paths, dist, cfg.checkpoint.keep, faults,
                                        async_save=cfg.checkpoint.async_save)
        for note in plan.notes:
            log.warning("placement: %s", note)
        found, verify_s = _newest_checkpoint(checkpoints, dist, events, base)
        universal = None
        if found is not None:
            changes = _check_resumable(found, cfg, force)
            if changes:
                log.warning("resuming with --force despite changes: %s", "; ".join(changes))
                events.write({"event": "config_forced", **base, "changes": changes})
            if found.state["world_size"] != dist.world_size:
                universal, done = universal_checkpoint(found, paths, dist)
                log.info("checkpoint %s was written by %d ranks, this job has %d: %s universal "
                         "copy %s", found.path.name, found.state["world_size"], dist.world_size,
                         "using the cached" if done["cached"] else "converted to a", universal)
                events.write({"event": "world_size_changed", **base, "step": found.step,
                              "from_world_size": found.state["world_size"],
                              "to_world_size": dist.world_size, **done})
        if dist.is_main:
            paths.config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

        stream = _stream(cfg, paths, dist)
        engine = build_engine(cfg, layout, cuda, plan.offload, load_universal=universal is not None)
        checkpoints.attach(engine)
        parameters = count_parameters(engine)
        # Before the first checkpoint: ~16 bytes a parameter (weights, fp32 master, Adam moments).
        checkpoints.estimate_bytes = 16 * parameters
        rng.seed_all(cfg.train.seed + dist.rank)
        start_step, train_time_s, samples_seen = 0, 0.0, 0
        if found is not None:
            load_started = time.time()
            checkpoints.load(engine, found, universal, cfg.train.seed)
            load_s = time.time() - load_started
            start_step, train_time_s = found.step, found.state.get("train_time_s", 0.0)
            samples_seen = found.state.get("samples_seen")
            log.info("resumed from %s (step %d), restart %d; verified in %.2f s, loaded in %.2f s",
                     found.path.name, found.step, restart, verify_s, load_s)
            events.write({"event": "resume", **base, "step": found.step,
                          "checkpoint": found.path.name, "verify_s": round(verify_s, 3),
                          "load_s": round(load_s, 3)})
        else:
            log.info("starting a new run in %s: %d parameters, world %d, micro %d x accum %d, "
                     "offload %s, planned memory %.1f GiB per GPU", paths.root, parameters,
                     dist.world_size, layout.micro_batch, layout.accum, plan.offload,
                     plan.memory.peak_gib)
            events.write({"event": "start", **base, "step": 0, "parameters": parameters})
        trainer = Trainer(cfg, dist, engine, stream, layout, checkpoints, flag, metrics, events,
                          info, faults, time_left=lambda: _time_left(slurm))
        statedump.after_load(engine, dist, found.step if found else 0)
        return trainer.run(start_step, train_time_s, samples_seen)
    except BaseException as exc:
        events.write({"event": "error", "time": time.time(), "error": type(exc).__name__,
                      "message": str(exc)[:2000]})
        raise
    finally:
        if monitor is not None:
            monitor.stop()
        events.close()
        metrics.close()
        lock.release()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    # Handlers first, for the default signals, before anything slow: a signal during start-up
    # (config, imports, model build) is kept for the first step boundary, not lost.
    with PreemptionFlag(PreemptionConfig().signals) as flag:
        env = DistEnv.from_mapping(os.environ)
        logs.configure(env.rank)
        args = parse_args(argv)
        try:
            cfg = load_config(args.config, args.set)
            flag.watch(cfg.preemption.signals)
            check_inputs(cfg, env)
            faults = FaultPlan.from_mapping(os.environ)
            return train(cfg, RunPaths.at(args.run_dir), env, SlurmEnv.from_mapping(os.environ),
                         flag, args.force, faults)
        except TelepathyError as exc:
            log.error("%s", exc)
            return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
