"""`telepathy resume` (`python -m telepathy.resume`): start a run, or resume it from its newest
valid checkpoint.

The same command does both, as one process (world size 1), under `torchrun`, or under `srun`.
Exit status (telepathy.core.exits): 0 finished, `preemption.exit_code` (75) saved and ready to
requeue, 2 bad input, 1 anything else.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, PreemptionConfig, load_config
from ..core import exits, logs
from ..core.errors import TelepathyError
from ..core.events import Stamp, launches
from ..core.jsonl import read_jsonl
from ..core.paths import RunPaths
from ..slurm.env import DistEnv, SlurmEnv
from ..testing.faults import FaultPlan
from ..testing.statedump import StateDump
from .signals import PreemptionFlag

log = logging.getLogger("telepathy.resume")


def run_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--config, --run-dir, --set and --force: what says which run (resume and launch)."""
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny-cpu.yaml")
    p.add_argument("--run-dir", required=True, help="run directory (created if missing)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.steps=200")
    p.add_argument("--force", action="store_true",
                   help="resume even if the config changes the training trajectory")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return run_arguments(argparse.ArgumentParser(
        prog="telepathy resume", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)).parse_args(argv)


@dataclass(frozen=True)
class Layouts:
    """The placement of this allocation, and the micro-batch caps that out-of-memory errors of
    earlier allocations carried, each from the step where it struck."""

    cfg: Config
    world_size: int
    gpu_mem_gib: float | None
    placement: Any
    carries: list[dict[str, Any]]
    run_dir: Path | None = None

    def at(self, step: int) -> Any:
        """The layout of optimizer step `step` (1-based): capped from where an OOM struck on."""
        from . import phases
        from .inputs import make_plan

        cap = phases.micro_cap(self.carries, step)
        return self.placement.layout if cap is None else \
            make_plan(self.cfg, self.world_size, self.gpu_mem_gib, cap, self.run_dir).layout

    def switches(self, first: int) -> list[tuple[int, Any]]:
        """The layouts that take over after step `first`, by the step they start at."""
        return [(c["from_step"], self.at(c["from_step"])) for c in self.carries
                if c["from_step"] > first]


def plan_layouts(cfg: Config, env: DistEnv, gpu_mem_gib: float | None, paths: RunPaths) -> Layouts:
    from . import phases
    from .inputs import make_plan

    placement = make_plan(cfg, env.world_size, gpu_mem_gib, run_dir=paths.root)
    carries = phases.carried_layouts(paths)
    if carries:
        placement = dataclasses.replace(placement, notes=placement.notes + tuple(
            f"micro-batch at most {c['micro_batch']} from step {c['from_step']} ({c['why']}; "
            f"{paths.plan_carry.name}: delete it to plan afresh)" for c in carries))
    return Layouts(cfg, env.world_size, gpu_mem_gib, placement, carries, paths.root)


@dataclass(frozen=True)
class Allocation:
    """This allocation once its process group, watchdog, run lock and logs are up: what every
    later phase of the start-up, and the trainer, may use."""

    cfg: Config
    paths: RunPaths
    slurm: SlurmEnv
    dist: Any
    watchdog: Any
    logs: Any
    """phases.RunLogs: events.jsonl, metrics.jsonl, the restart index."""
    info: Any
    """trainer.RunInfo: the restart, the job, the data's sidecar, start-up's allowance."""
    saves_s: tuple[float, ...]
    """The last saves' seconds, measured by earlier allocations."""
    stamp: Callable[[], Stamp]

    def expect(self, what: str) -> None:
        """The watchdog's next stage of the start-up, with start-up's allowance."""
        self.watchdog.expect(f"start-up: {what}", self.info.first_step_allowance_s)


def open_allocation(stack: ExitStack, cfg: Config, paths: RunPaths, env: DistEnv,
                    slurm: SlurmEnv, device: Any, layouts: Layouts, data: dict | None,
                    log_files: Mapping[str, str] | None) -> Allocation:
    """Collective: the process group, the watchdog, the run lock, the logs with the launch
    event, the node heartbeat and the system monitor; each closed by `stack`."""
    from . import phases
    from .trainer import RunInfo

    dist = stack.enter_context(phases.process_group(env, device, phases.collective_timeout_s(cfg)))
    logs.set_rank(dist.rank)
    job_id = slurm.job_id or env.job_id
    # The allocation's stamp (its index is the number of launches so far, also before its own
    # launch event is written).
    stamp = [Stamp(launches(list(read_jsonl(paths.events))), job_id, dist.world_size)]
    dog = stack.enter_context(phases.watchdog(cfg, paths, dist, lambda: stamp[0]))
    dog.expect("start-up: taking the run lock", phases.STARTUP_FLOOR_S)
    stack.enter_context(phases.run_lock(dist, paths, job_id))
    run_logs = stack.enter_context(phases.run_logs(dist, paths, job_id))
    stamp[0] = run_logs.events.stamp
    stack.enter_context(phases.node_heartbeat(cfg, paths, dist, env, lambda: stamp[0],
                                              lambda: dog.step))
    durations = phases.measured_durations(paths, dist)
    info = RunInfo(restart=run_logs.restart, job_id=job_id, data=data,
                   first_step_allowance_s=phases.startup_allowance_s(durations))
    run = Allocation(cfg, paths, slurm, dist, dog, run_logs, info, durations.saves_s,
                     lambda: stamp[0])
    run.expect("finding the checkpoint")
    phases.record_launch(run_logs.events, dist, env, slurm, device, layouts.placement, log_files)
    stack.enter_context(phases.system_monitor(cfg, env, paths))
    return run


def checkpoint_manager(run: Allocation, faults: FaultPlan) -> Any:
    from ..checkpoint.manager import CheckpointManager
    from . import phases

    checkpoints = CheckpointManager(run.paths, run.dist, run.cfg.checkpoint.keep, faults,
                                    hash_algorithm=run.cfg.checkpoint.hash,
                                    async_save=run.cfg.checkpoint.async_save,
                                    progress=run.watchdog.progress,
                                    timeout_s=phases.collective_timeout_s(run.cfg))
    checkpoints.recent_seconds = list(run.saves_s)
    return checkpoints


def build(run: Allocation, layout: Any, device: Any, offload: Any, checkpoints: Any,
          load_universal: bool) -> tuple[Any, int, int]:
    """The ZeRO-3 engine, saved through `checkpoints`: (engine, parameters, trained ones)."""
    from ..checkpoint import basemodel as base
    from ..core.fsutil import write_json_atomic
    from ..engine.build import build_engine, count_parameters, count_trainable, has_frozen, import_libraries

    run.expect("building the engine")
    import_libraries()
    freeze_imports()
    engine = build_engine(run.cfg, layout, device.cuda, offload, load_universal=load_universal)
    checkpoints.attach(engine)
    parameters, trainable = count_parameters(engine), count_trainable(engine)
    # A frozen base stays where it is (model.pretrained_path or model.base_paths, verified at
    # every start); without one, the frozen parameters are saved too.
    checkpoints.exclude_frozen = bool(base.bases(run.cfg)) and has_frozen(engine)
    if run.cfg.model.module is not None and run.dist.is_main:  # for the planner (model.py)
        write_json_atomic(run.paths.module_shape, {"parameters": parameters,
                                                   "trainable": trainable})
    # Before the first checkpoint: ~16 bytes a parameter (weights, fp32 master, Adam moments).
    checkpoints.estimate_bytes = 16 * (trainable if checkpoints.exclude_frozen else parameters)
    return engine, parameters, trainable


def open_mirror(cfg: Config) -> Any:
    """checkpoint.mirror's store (no request is made yet), or None."""
    if cfg.checkpoint.mirror is None:
        return None
    from ..checkpoint.mirror import open_store
    return open_store(cfg.checkpoint.mirror, cfg.checkpoint.mirror_options)


def mirror_uploader(stack: ExitStack, run: Allocation, store: Any, checkpoints: Any,
                    faults: FaultPlan) -> Any:
    """Rank 0's background uploads to the mirror, started now (what an earlier allocation left
    unfinished goes on at once) and woken by every durable save."""
    if store is None or not run.dist.is_main:
        return None
    from ..checkpoint.mirror import Uploader

    uploader = Uploader(store, run.paths, run.cfg.checkpoint.mirror_kept, run.logs.events.emit,
                        faults).start()
    stack.callback(uploader.stop)
    checkpoints.on_durable = uploader.wake
    uploader.wake()
    return uploader


MIRROR_EXIT_S = 600.0
"""At most this long, the end of a process waits for the mirror's uploads (after a preemption
signal: at most what SLURM leaves, less a margin; the next allocation goes on with the rest)."""


def make_trainer(stack: ExitStack, run: Allocation, engine: Any, stream: Any, layout: Any,
                 layouts: Layouts, checkpoints: Any, start: Any, flag: PreemptionFlag,
                 faults: FaultPlan, dump: StateDump, uploader: Any = None) -> Any:
    """The training loop's collaborators: the steps on the engine, the evaluation, the tracker
    relay (stopped by `stack`), the mirror's last uploads, the carrying of a smaller micro-batch
    after an OOM."""
    from . import phases
    from .steps import EngineSteps, objective_of
    from .trainer import EXIT_MARGIN_S, Trainer

    cfg, dist = run.cfg, run.dist
    relay = phases.tracker_relay(cfg, run.paths, dist, run.logs.restart, start.step,
                                 run.info.job_id)
    if relay is not None:
        stack.callback(relay.stop)

    def carry(new: Any, step: int, exc: BaseException) -> None:
        phases.carry_smaller_layout(run.paths, dist, run.stamp, trainer.layout, new, step, exc)
        # Leave now: unwinding would destroy a process group whose collectives the dropped
        # step left in flight (NCCL may block there); srun stops the other ranks.
        logs.flush()
        os._exit(exits.OUT_OF_MEMORY)

    def before_exit(budget_s: float) -> None:
        """Rank 0's last work (every rank waits for it at the barrier after): the tracker relay's
        flush, then the mirror's uploads in hand."""
        if cfg.checkpoint.mirror is not None:
            run.watchdog.expect("leaving: waiting for rank 0's tracker relay and mirror upload",
                                budget_s + MIRROR_EXIT_S + 30)
        if relay is not None:
            relay.stop(budget_s)
        if uploader is not None:
            left = phases.time_left(run.slurm)
            uploader.finish(MIRROR_EXIT_S if left is None
                            else max(0.0, min(MIRROR_EXIT_S, left - EXIT_MARGIN_S)))

    steps = EngineSteps(engine, stream, dist, faults, objective_of(cfg, stream))
    trainer = Trainer(cfg, dist, steps, stream, layout,
                      checkpoints, flag, run.logs.metrics, run.logs.events, run.info, faults,
                      time_left=lambda: phases.time_left(run.slurm), dump=dump,
                      watchdog=run.watchdog, carry=carry,
                      switches=layouts.switches(start.step + 1),
                      before_exit=before_exit,
                      evaluator=phases.evaluator(cfg, dist, layout.micro_batch, faults))
    return trainer


def train(cfg: Config, paths: RunPaths, env: DistEnv, slurm: SlurmEnv, flag: PreemptionFlag,
          force: bool, faults: FaultPlan, dump: StateDump = StateDump(),
          data: dict | None = None, log_files: Mapping[str, str] | None = None) -> int:
    """The set-up phases (phases.py) in order, then the training loop; the exit code."""
    from ..checkpoint import rng
    from . import phases

    device = phases.choose_device(cfg, env)
    layouts = plan_layouts(cfg, env, device.gpu_mem_gib, paths)
    mirror = open_mirror(cfg)  # before any distributed work: a bad URL or a missing client
    with ExitStack() as stack:
        run = open_allocation(stack, cfg, paths, env, slurm, device, layouts, data, log_files)
        checkpoints = checkpoint_manager(run, faults)
        resumable = phases.find_checkpoint(checkpoints, cfg, paths, run.dist, run.logs.events,
                                           force, data, run.watchdog, mirror)
        uploader = mirror_uploader(stack, run, mirror, checkpoints, faults)
        run.expect("preparing the data")
        phases.write_effective_config(cfg, paths, run.dist)
        phases.keep_tokenizer(data, paths, run.dist)
        stream = phases.token_stream(cfg, paths, run.dist, data)
        layout = layouts.at((resumable.found.step if resumable.found else 0) + 1)
        engine, parameters, trainable = build(run, layout, device, layouts.placement.offload,
                                              checkpoints, resumable.universal is not None)
        rng.seed_all(cfg.train.seed + run.dist.rank)
        run.expect("loading the checkpoint")
        start = phases.restore(checkpoints, engine, resumable, cfg, run.logs.events,
                               run.logs.restart, parameters, layouts.placement, run.dist, paths,
                               trainable)
        trainer = make_trainer(stack, run, engine, stream, layout, layouts, checkpoints, start,
                               flag, faults, dump, uploader)
        dump.after_load(engine, run.dist, start.step)
        settle_gc()
        return trainer.run(start.step, start.train_time_s, start.samples_seen, start.evaluated)


def execute(config: str | Path, run_dir: str | Path, flag: PreemptionFlag,
            overrides: Sequence[str] = (), force: bool = False,
            environ: Mapping[str, str] = os.environ, extra_signals: Sequence[str] = (),
            log_files: Mapping[str, str] | None = None) -> int:
    """All of `telepathy resume` after its handlers are in place: the exit code.

    `flag` is already installed (for the default signals); it switches to the configured ones
    plus `extra_signals` (a launcher's own, such as submitit's SIGUSR2) once the config is read.
    `log_files` names this rank's stdout and stderr files when the launcher knows them.
    """
    env = DistEnv.from_mapping(environ)
    try:
        cfg = load_config(config, list(overrides))
        flag.watch([*cfg.preemption.signals, *extra_signals])
        from ..checkpoint import basemodel as base
        from .inputs import check_inputs  # numpy and the planner: no torch yet

        data = check_inputs(cfg, env)
        base.check(cfg, RunPaths.at(run_dir))
        return train(cfg, RunPaths.at(run_dir), env, SlurmEnv.from_mapping(environ), flag, force,
                     FaultPlan.from_mapping(environ), StateDump.from_mapping(environ), data, log_files)
    except TelepathyError as exc:
        log.error("%s", exc)
        return exits.BAD_INPUT


def freeze_imports() -> None:
    """Mid start-up, once the engine's libraries are imported, when `main` turned the cyclic
    collector off: freeze every object so far (about 600,000, nearly all of them the modules'),
    so that the collections still to come before the first step do not scan them. DeepSpeed
    runs one itself while it sets up ZeRO-3 (`gc.collect()` in its `defragment`), and
    `settle_gc` another. The price: the few thousand cyclic objects that imports leave behind
    (about 10,000, a few MB, counted on the tiny config) are kept, not freed. Measured on 2
    cores: 0.48 s less CPU of 3.9 s for a one-step run (bench/startup.py)."""
    if not gc.isenabled():
        gc.freeze()


def settle_gc() -> None:
    """The end of start-up, when `main` turned the cyclic collector off: collect start-up's own
    reference cycles once, freeze what is left (the modules, the model, the engine: they live as
    long as the run, and no later collection rescans them), and turn the collector back on."""
    if not gc.isenabled():
        gc.collect()
        gc.freeze()
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    # No cyclic collection during start-up (settle_gc turns it back on before the first step):
    # torch, DeepSpeed and transformers load about 3,000 modules and build millions of objects
    # that live as long as the run, and the collector would rescan them again and again as they
    # pile up. Measured on 2 cores: 1.1 s less CPU of 5.6 s from start to the first step
    # (bench/startup.py).
    collector_was_on = gc.isenabled()
    gc.disable()
    try:
        # Handlers first, for the default signals, before anything slow: a signal during
        # start-up (config, imports, model build) is kept for the first step boundary, not lost.
        # This module imports nothing heavy at its top for the same reason.
        with PreemptionFlag(PreemptionConfig().signals) as flag:
            logs.configure(DistEnv.from_mapping(os.environ).rank)
            args = parse_args(argv)
            return execute(args.config, args.run_dir, flag, args.set, args.force)
    finally:
        if collector_was_on:  # a caller in the same process (a test, a notebook) gets it back
            gc.enable()


if __name__ == "__main__":
    sys.exit(main())
