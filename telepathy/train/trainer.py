"""The training loop: steps, metrics, scheduled checkpoints, and preemption at step boundaries.

Right after each step `saving.step_save` says whether to save it; then, at the boundary, the
ranks agree (one all-reduce) on whether a signal came, a time-based save is due, or a background
save failed, and `saving.decide` says what to do. Its collaborators are
Protocols (`protocols.py`): the real process group, checkpoint manager and DeepSpeed engine in a
run, fakes in unit tests.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import Config
from ..core import exits
from ..core.eventlog import EventLog
from ..core.events import Event, SaveResult
from ..plan.placement import Layout, smaller
from ..testing.faults import FaultPlan
from ..testing.statedump import StateDump
from .protocols import Checkpoints, Collective, DataPosition, Flag, NoWatchdog, Progress, Steps
from .saving import Action, Boundary, best_save, decide, eval_due, step_save, time_due

log = logging.getLogger(__name__)


HEARD_WAIT_S = 1.0
"""After a preemption's save, how long a rank that heard no signal itself waits for one before
the ranks say who heard it (the `preempted` event's `heard`)."""

EXIT_MARGIN_S = 20.0
"""Seconds kept, after a preemption signal, between the relay's last flush and SLURM's end of
the job: srun's teardown and the requeue step."""


@dataclass
class RunInfo:
    """Facts about this allocation that go into every metric and checkpoint."""

    restart: int
    job_id: str | None
    data: dict[str, Any] | None = None
    """The token file's sidecar (telepathy data prepare), recorded in every checkpoint."""
    first_step_allowance_s: float | None = None
    """How long start-up and the first step may go without progress (watchdog), from the
    longest earlier start-up; None: train.hang_timeout_s."""


class RankOutOfMemory(SystemExit):
    """This rank ran out of memory while others wait in collectives; the smaller micro-batch is
    carried to the next allocation. Exits with exits.OUT_OF_MEMORY."""

    def __init__(self) -> None:
        super().__init__(exits.OUT_OF_MEMORY)


class Trainer:
    def __init__(self, cfg: Config, dist: Collective, steps: Steps, data: DataPosition,
                 layout: Layout, checkpoints: Checkpoints, flag: Flag, metrics: Any,
                 events: EventLog, info: RunInfo, faults: FaultPlan = FaultPlan(),
                 time_left: Callable[[], float | None] = lambda: None,
                 dump: StateDump = StateDump(), watchdog: Progress = NoWatchdog(),
                 carry: Callable[[Layout, int, BaseException], None] | None = None,
                 switches: list[tuple[int, Layout]] = (),
                 before_exit: Callable[[float], None] = lambda budget_s: None,
                 evaluator: Any = None):
        self.cfg = cfg
        self.dist = dist
        self.steps = steps
        self.data = data
        self.layout = layout
        self.checkpoints = checkpoints
        self.flag = flag
        self.metrics = metrics
        self.events = events
        self.info = info
        self.faults = faults
        self.time_left = time_left
        """Seconds until SLURM ends this job, or None (asked on rank 0 on a signal)."""
        self.dump = dump
        self.watchdog = watchdog
        self.carry = carry
        """Across ranks (world > 1): record the smaller layout for the next allocation (and an
        `oom` event) before this rank leaves; None: such an error is raised."""
        self.before_exit = before_exit
        """Rank 0's last work before the ranks leave together, given the most seconds it may
        take: the tracker relay's flush (the other ranks wait for it in the last barrier)."""
        self.switches = dict(switches)
        """Layouts carried from earlier allocations, by the (1-based) step they start at."""
        self.evaluator = evaluator
        """Runs the validation (evaluate.Evaluator); None: eval.path is not set."""
        self.last_evaluated = 0
        """The step of the newest finished evaluation."""
        self.best: dict[str, Any] | None = None
        """The lowest eval_loss so far and its step: {"step", "eval_loss"}."""
        self.train_time_s = 0.0
        self.last_save_time = time.time()
        self.samples_seen = 0
        self.oom_recoveries = 0

    # -- one optimizer step --------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[float, float]:
        """Run optimizer step `step` (0-based), retried with a smaller micro-batch after an
        out-of-memory error. Returns (global mean loss, lr used)."""
        carried = self.switches.get(step + 1)
        if carried is not None and carried != self.layout:
            log.info("step %d: micro-batch %d x accum %d from here on (carried after an "
                     "out-of-memory error; was %d x %d)", step + 1, carried.micro_batch,
                     carried.accum, self.layout.micro_batch, self.layout.accum)
            self.steps.drop_partial_step(self.steps.counters(), carried)  # at a boundary: none
            self.layout = carried
        self.faults.hit("step.start", step + 1, self.dist.rank)
        self.faults.hit("step.exception", step + 1, self.dist.rank)
        counters = self.steps.counters()
        while True:
            try:
                return self.steps.run(step, self.samples_seen, self.layout)
            except torch.OutOfMemoryError as exc:
                self._recover_from_oom(step, exc, counters)

    def _recover_from_oom(self, step: int, exc: BaseException, counters: Any) -> None:
        """Drop the partial step, shrink the micro-batch (same global batch), and retry.

        Kept for the rest of this allocation; the next one plans afresh. Raises the error again
        when the micro-batch cannot shrink or the retries of placement.max_oom_retries are spent.

        With other ranks beside this one, retrying here is not safe: they may be waiting in a
        collective of the step this rank just dropped. This rank then carries the smaller
        micro-batch to the next allocation (`carry`) and leaves with exits.OUT_OF_MEMORY; the
        launcher stops the others and the job is requeued.
        """
        new = smaller(self.layout, self.cfg.placement.micro_batch_sizes)
        if new is None or self.oom_recoveries >= self.cfg.placement.max_oom_retries:
            log.error("out of memory at step %d with micro-batch %d x accum %d; cannot shrink "
                      "further (%d recoveries so far, placement.max_oom_retries=%d)", step + 1,
                      self.layout.micro_batch, self.layout.accum, self.oom_recoveries,
                      self.cfg.placement.max_oom_retries)
            raise exc
        if self.dist.world_size > 1:
            if self.carry is None:
                raise exc
            log.error("out of memory on rank %d at step %d with micro-batch %d x accum %d: the "
                      "other ranks may be inside this step's collectives, so this allocation "
                      "ends here; the next one resumes from the newest checkpoint and trains "
                      "with micro-batch %d x accum %d (global batch %d unchanged) from step %d on",
                      self.dist.rank, step + 1, self.layout.micro_batch, self.layout.accum,
                      new.micro_batch, new.accum, new.global_batch, step + 1)
            self.carry(new, step + 1, exc)
            raise RankOutOfMemory() from exc
        del exc
        self.steps.drop_partial_step(counters, new)
        self.oom_recoveries += 1
        log.warning("out of memory at step %d: retrying with micro-batch %d x accum %d (was %d x "
                    "%d), global batch %d unchanged, for the rest of this allocation", step + 1,
                    new.micro_batch, new.accum, self.layout.micro_batch, self.layout.accum,
                    new.global_batch)
        self.events.emit(Event.OOM_RECOVERED, step=step + 1, micro_batch=new.micro_batch,
                         accum=new.accum, previous_micro_batch=self.layout.micro_batch,
                         previous_accum=self.layout.accum)
        self.layout = new

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self, step: int) -> dict[str, Any]:
        pos = self.data.position(self.samples_seen)
        return {"step": step, "samples_seen": self.samples_seen,
                "global_batch": self.layout.global_batch,
                "data_position": {"epoch": pos.epoch, "offset": pos.offset},
                "world_size": self.dist.world_size, "micro_batch": self.layout.micro_batch,
                "accum": self.layout.accum, "restart": self.info.restart,
                "train_time_s": self.train_time_s, "job_id": self.info.job_id,
                "telepathy_version": __version__, "time": time.time(),
                "config": self.cfg.to_dict(), "data": self.info.data,
                "eval": {"last_step": self.last_evaluated}, "best": self.best}

    def save(self, step: int, reason: str, wait: bool = False) -> bool:
        """Start a checkpoint of `step` (finished in the background unless `wait`).

        Returns whether it started; a save refused for lack of space leaves the previous one.
        """
        ok, free, needed = self.checkpoints.space()
        if not ok:
            self.last_save_time = time.time()  # a time-based save retries at the next interval
            log.warning("not saving step %d (%s): %.2f GB free on the run directory's filesystem, a "
                        "checkpoint needs ~%.2f GB; the previous checkpoint stays the newest. Free "
                        "space or lower checkpoint.keep", step, reason, free / 1e9, needed / 1e9)
            self.events.emit(Event.CHECKPOINT_SKIPPED, step=step, reason=reason, free_bytes=free,
                             needed_bytes=needed)
            return False
        self.events.emit(Event.CHECKPOINT_STARTED, step=step, reason=reason)
        self.watchdog.expect(f"saving checkpoint step {step}", self.save_allowance())
        stall = self.checkpoints.save(self.steps.engine, step, self.state(step), reason,
                                      wait=wait)
        self.watchdog.expect(f"training after the save of step {step}")
        self.last_save_time = time.time()
        log.info("checkpoint step %d (%s): training blocked %.2f s for the snapshot%s", step,
                 reason, stall, "" if wait else "; writing in the background")
        self.dump.after_save(self.steps.engine, self.dist, step)
        return True

    def report(self, result: SaveResult) -> None:
        if result.ok:
            log.info("saved checkpoint step %d (%s): %.1f MB in %.2f s (stall %.2f s)",
                     result.step, result.reason, (result.bytes or 0) / 1e6, result.seconds,
                     result.stall_s)
        else:
            log.error("checkpoint step %d (%s) FAILED: %s. Its directory was removed; the "
                      "previous checkpoint stays the newest", result.step, result.reason,
                      result.error)
        self.events.emit(result.event, **result.fields())

    def report_saves(self) -> bool:
        """Log the saves that finished; whether one of them failed."""
        results = self.checkpoints.completed()
        for result in results:
            self.report(result)
        return any(not r.ok for r in results)

    def warn_if_save_may_not_fit(self, step: int) -> None:
        """On a signal: say loudly when the last save took longer than the time left."""
        left = self.time_left() if self.dist.is_main else None
        expected = self.checkpoints.expected_seconds
        if left is None or expected is None or expected < left:
            return
        log.warning("the final save may not finish: recent saves took up to %.0f s and SLURM "
                    "ends this job in %.0f s. If it is cut off, the previous checkpoint stays "
                    "valid and the steps since it are trained again. Give the job more warning "
                    "(--signal=TERM@N, GraceTime)", expected, left)
        self.events.emit(Event.SAVE_DEADLINE_RISK, step=step, expected_save_s=expected,
                         time_left_s=left)

    def save_allowance(self) -> float | None:
        """How long a save may go without progress: twice the longest recent save."""
        expected = self.checkpoints.expected_seconds
        return None if expected is None else 2 * expected

    def finish_in_flight(self, last_saved: int) -> int:
        """Collective: wait for the save in flight; the step of the newest complete checkpoint
        if a save failed on any rank, else `last_saved`."""
        self.watchdog.expect("waiting for the checkpoint in flight", self.save_allowance())
        self.checkpoints.wait()
        failed, = self.dist.any([self.report_saves()])
        return min(last_saved, self.checkpoints.newest_complete_step()) if failed else last_saved

    # -- the loop --------------------------------------------------------------------------------
    def boundary(self, step: int, last_saved: int) -> tuple[Boundary, int]:
        """Collective: what the ranks agree on before step `step + 1`, and `last_saved` lowered
        to the newest complete checkpoint if a background save failed on any rank."""
        due = time_due(time.time(), self.last_save_time, self.cfg.checkpoint.every_min)
        preempt, due, failed = self.dist.any([self.flag.is_set, due, self.report_saves()])
        if failed:
            last_saved = min(last_saved, self.checkpoints.newest_complete_step())
        return Boundary(step, self.cfg.train.steps, last_saved, preempt, due), last_saved

    def heard(self) -> str | None:
        """The signal this rank received itself. A rank that has none yet waits up to
        HEARD_WAIT_S for it: the ranks agree as soon as one of them heard, and the signal may
        still be on its way to another node."""
        deadline = time.monotonic() + HEARD_WAIT_S
        while self.flag.name is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.flag.name

    def leave(self, boundary: Boundary, action: Action) -> int:
        """Collective: the last save of this process (synchronous), then the exit code."""
        step = boundary.step
        if action is Action.PREEMPT:
            self.events.emit(Event.SIGNAL, step=step, signal=self.flag.name,
                             received_at=self.flag.received_at)
            log.warning("preemption signal %s: saving at step %d and exiting with %d",
                        self.flag.name or "(on another rank)", step,
                        self.cfg.preemption.exit_code)
            self.warn_if_save_may_not_fit(step)
        last_saved = self.finish_in_flight(boundary.last_saved)
        decision = decide(dataclasses.replace(boundary, last_saved=last_saved))
        if decision.save:
            self.save(step, decision.save, wait=decision.wait)
        self.report_saves()
        if action is Action.PREEMPT:
            # Which ranks, on which hosts, heard a signal themselves (SLURM signals each node's
            # tasks through that node's slurmd).
            heard = self.dist.all_gather_object((socket.gethostname(), self.heard()))
            self.events.emit(Event.PREEMPTED, step=step, exit_code=self.cfg.preemption.exit_code,
                             heard=[{"rank": r, "host": host, "signal": name}
                                    for r, (host, name) in enumerate(heard)])
            code = self.cfg.preemption.exit_code
        else:
            self.events.emit(Event.FINISHED, step=step)
            log.info("run finished at step %d", step)
            code = exits.FINISHED
        # Every rank may wait this long for rank 0's last work below; after a preemption signal
        # no longer than SLURM leaves, less a margin for the requeue step (the next allocation
        # sends what the relay did not).
        budget = self.cfg.track.flush_s
        if action is Action.PREEMPT and self.dist.is_main:
            left = self.time_left()
            if left is not None:
                budget = max(0.0, min(budget, left - EXIT_MARGIN_S))
        self.watchdog.expect("leaving: waiting for rank 0's tracker relay",
                             self.cfg.track.flush_s + 5 if self.cfg.track.enabled else None)
        self.before_exit(budget)
        self.dist.barrier()  # leave together: srun stops the others when one rank exits
        return code

    def run(self, start_step: int, train_time_s: float = 0.0, samples_seen: int | None = None,
            evaluated: dict[str, Any] | None = None) -> int:
        """Train from `start_step` to the end. Returns 0 when finished, the preemption code if not.

        `samples_seen` is the data position (default: start_step global batches); `evaluated`
        the checkpoint's record of its evaluations ({"eval": ..., "best": ...})."""
        total = self.cfg.train.steps
        self.train_time_s = train_time_s
        self.samples_seen = start_step * self.layout.global_batch if samples_seen is None \
            else samples_seen
        self.last_evaluated = ((evaluated or {}).get("eval") or {}).get("last_step", 0)
        self.best = (evaluated or {}).get("best")
        last_saved = start_step
        step = start_step
        self.watchdog.expect(f"the first step ({start_step + 1}) after start-up",
                             self.info.first_step_allowance_s)
        while True:
            improved = self.evaluate(step, start_step)
            reason = step_save(step, total, last_saved, self.cfg.checkpoint.every_steps) or \
                best_save(step, total, last_saved, improved)
            if reason and self.save(step, reason):
                last_saved = step
            elif improved and step == last_saved:  # saved before this evaluation could finish
                self.checkpoints.record_best(self.best)
            boundary, last_saved = self.boundary(step, last_saved)
            decision = decide(boundary)
            if decision.action is not Action.TRAIN:
                return self.leave(boundary, decision.action)
            if decision.save and self.save(step, decision.save):
                last_saved = step
            started = time.perf_counter()
            loss, lr = self.train_step(step)
            elapsed = time.perf_counter() - started
            self.train_time_s += elapsed
            self.samples_seen += self.layout.global_batch
            step += 1
            self.watchdog.progress(step)
            self.watchdog.expect(f"training step {step + 1}")
            self.log_step(step, total, loss, lr, elapsed)
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; lower train.lr or check "
                                         "the data")

    # -- validation -------------------------------------------------------------------------------
    def evaluate(self, step: int, start_step: int) -> bool:
        """Collective: the evaluation of step `step` when one is due; whether it improved on the
        best that checkpoint.keep_best keeps (only then is a best tracked). A preemption signal
        stops it unfinished (nothing written): the boundary then saves and leaves, and the
        resumed run evaluates this step again, first."""
        if self.evaluator is None or not eval_due(step, self.cfg.train.steps,
                                                  self.cfg.eval.every_steps, self.last_evaluated):
            return False
        # Right after start-up the first forward still has start-up's allowance.
        allowance = self.info.first_step_allowance_s if step == start_step else None
        self.watchdog.expect(f"evaluating after step {step}", allowance)
        result = self.evaluator.run(self.steps.engine, step, self.flag, self.watchdog.progress)
        self.watchdog.expect(f"training step {step + 1}", allowance)
        if result is None:
            log.warning("preemption signal during the evaluation of step %d: it stops here and "
                        "is done again after the resume", step)
            self.events.emit(Event.EVAL_STOPPED, step=step, signal=self.flag.name)
            return False
        self.last_evaluated = step
        self.metrics.write({**result.record(), "world_size": self.dist.world_size,
                            "restart": self.info.restart, "time": time.time(),
                            "job_id": self.info.job_id})
        log.info("step %d eval_loss %.4f over %d tokens (%.2f s)", step, result.loss,
                 result.tokens, result.seconds)
        if not self.cfg.checkpoint.keep_best or (self.best is not None
                                                 and result.loss >= self.best["eval_loss"]):
            return False
        previous, self.best = self.best or {}, {"step": step, "eval_loss": result.loss}
        self.events.emit(Event.BEST_CHECKPOINT, step=step, eval_loss=result.loss,
                         previous_step=previous.get("step"),
                         previous_eval_loss=previous.get("eval_loss"))
        return True

    def log_step(self, step: int, total: int, loss: float, lr: float, elapsed: float) -> None:
        tokens = self.steps.last_tokens or self.layout.global_batch * self.cfg.data.seq_len
        record = {"step": step, "loss": loss, "lr": lr, "world_size": self.dist.world_size,
                  "restart": self.info.restart, "time": time.time(), "step_time_s": elapsed,
                  "tokens_per_s": tokens / elapsed,
                  "samples_per_s": self.layout.global_batch / elapsed,
                  "micro_batch": self.layout.micro_batch, "accum": self.layout.accum,
                  "job_id": self.info.job_id}
        norm = self.steps.grad_norm()
        if norm is not None:
            record["grad_norm"] = norm
        peak = self.steps.memory_peak_gb()
        if peak is not None:
            record["gpu_mem_peak_gb"] = peak
        self.metrics.write(record)
        if step % self.cfg.train.log_every == 0 or step == total:
            log.info("step %d/%d loss %.4f lr %.3e %.0f tok/s", step, total, loss, lr,
                     tokens / elapsed)
