"""The training loop: steps, metrics, scheduled checkpoints, and preemption at step boundaries."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, statedump
from .checkpoint import CheckpointManager
from .config import Config
from .data import TokenStream, rank_slice
from .distributed import Dist
from .placement import Layout, smaller
from .faults import FaultPlan
from .signals import PreemptionFlag

log = logging.getLogger(__name__)

FINISHED = 0


@dataclass
class RunInfo:
    """Facts about this allocation that go into every metric, event and checkpoint."""

    restart: int
    job_id: str | None
    launched_at: float


class Trainer:
    def __init__(self, cfg: Config, dist: Dist, engine: Any, stream: TokenStream, layout: Layout,
                 checkpoints: CheckpointManager, flag: PreemptionFlag, metrics: Any, events: Any,
                 info: RunInfo, faults: FaultPlan = FaultPlan(),
                 time_left: Any = lambda: None):
        self.cfg = cfg
        self.dist = dist
        self.engine = engine
        self.stream = stream
        self.layout = layout
        self.checkpoints = checkpoints
        self.flag = flag
        self.metrics = metrics
        self.events = events
        self.info = info
        self.faults = faults
        self.train_time_s = 0.0
        self.last_save_time = time.time()
        self.samples_seen = 0
        self.oom_recoveries = 0
        self.time_left = time_left
        """Seconds until SLURM ends this job, or None (asked on rank 0 on a signal)."""

    def event(self, name: str, **fields: Any) -> None:
        self.events.write({"event": name, "time": time.time(), "restart": self.info.restart,
                           "job_id": self.info.job_id, "rank_world": self.dist.world_size,
                           **fields})

    # -- one optimizer step --------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[float, float]:
        """Run optimizer step `step` (0-based), retried with a smaller micro-batch after an
        out-of-memory error. Returns (global mean loss, lr used)."""
        self.faults.hit("step.start", step + 1, self.dist.rank)
        self.faults.hit("step.exception", step + 1, self.dist.rank)
        counters = (self.engine.micro_steps, self.engine.global_samples)
        while True:
            try:
                return self._step(step)
            except torch.OutOfMemoryError as exc:
                self._recover_from_oom(step, exc, counters)

    def _step(self, step: int) -> tuple[float, float]:
        gb = self.layout.global_batch
        ids = self.stream.sample_ids(self.samples_seen, gb)
        lr = self.engine.get_lr()[0]
        total = torch.zeros((), dtype=torch.float32, device=self.dist.device)
        for micro_step in range(self.layout.accum):
            mine = rank_slice(ids, micro_step, self.dist.rank, self.dist.world_size,
                              self.layout.micro_batch)
            batch = torch.from_numpy(self.stream.batch(mine)).to(self.dist.device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logits = self.engine(input_ids=inputs).logits
            if micro_step == min(1, self.layout.accum - 1):
                self.faults.hit("step.oom", step + 1, self.dist.rank)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        return self.dist.mean(total / self.layout.accum), lr

    def _recover_from_oom(self, step: int, exc: BaseException, counters: tuple[int, int]) -> None:
        """Drop the partial step, shrink the micro-batch (same global batch), and retry.

        Kept for the rest of this allocation; the next one plans afresh. Raises the error again
        when the micro-batch cannot shrink or the retries of placement.max_oom_retries are spent.
        """
        new = smaller(self.layout, self.cfg.placement.micro_batch_sizes)
        if new is None or self.oom_recoveries >= self.cfg.placement.max_oom_retries:
            log.error("out of memory at step %d with micro-batch %d x accum %d; cannot shrink "
                      "further (%d recoveries so far, placement.max_oom_retries=%d)", step + 1,
                      self.layout.micro_batch, self.layout.accum, self.oom_recoveries,
                      self.cfg.placement.max_oom_retries)
            raise exc
        del exc
        # Release what the failed micro-steps hold: gathered parameters, partial gradients
        # (zero_grad makes the next backward overwrite, not add to, the gradient partitions).
        self.engine.optimizer.parameter_offload.get_param_coordinator().reset_step()
        self.engine.empty_partition_cache()
        self.engine.optimizer.zero_grad()
        gc.collect()
        if self.dist.device.type == "cuda":
            torch.cuda.empty_cache()
        self.engine.set_train_micro_batch_size(new.micro_batch)
        self.engine.set_train_batch_size(new.global_batch)
        micro_steps, samples = counters
        self.engine.micro_steps = micro_steps - micro_steps % new.accum
        self.engine.global_samples = samples
        self.oom_recoveries += 1
        log.warning("out of memory at step %d: retrying with micro-batch %d x accum %d (was %d x "
                    "%d), global batch %d unchanged, for the rest of this allocation", step + 1,
                    new.micro_batch, new.accum, self.layout.micro_batch, self.layout.accum,
                    new.global_batch)
        self.event("oom_recovered", step=step + 1, micro_batch=new.micro_batch, accum=new.accum,
                   previous_micro_batch=self.layout.micro_batch, previous_accum=self.layout.accum)
        self.layout = new

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self, step: int) -> dict[str, Any]:
        pos = self.stream.position(self.samples_seen)
        return {"step": step, "samples_seen": self.samples_seen,
                "global_batch": self.layout.global_batch,
                "data_position": {"epoch": pos.epoch, "offset": pos.offset},
                "world_size": self.dist.world_size, "micro_batch": self.layout.micro_batch,
                "accum": self.layout.accum, "restart": self.info.restart,
                "train_time_s": self.train_time_s, "job_id": self.info.job_id,
                "telepathy_version": __version__, "time": time.time(),
                "config": self.cfg.to_dict()}

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
            self.event("checkpoint_skipped", step=step, reason=reason, free_bytes=free,
                       needed_bytes=needed)
            return False
        self.event("checkpoint_started", step=step, reason=reason)
        stall = self.checkpoints.save(self.engine, step, self.state(step), reason, wait=wait)
        self.last_save_time = time.time()
        log.info("checkpoint step %d (%s): training blocked %.2f s for the snapshot%s", step,
                 reason, stall, "" if wait else "; writing in the background")
        statedump.after_save(self.engine, self.dist, step)
        return True

    def report_saves(self) -> bool:
        """Log the saves that finished; whether one of them failed."""
        failed = False
        for result in self.checkpoints.completed():
            if "error" in result:
                failed = True
                log.error("checkpoint step %d (%s) FAILED: %s. Its directory was removed; the "
                          "previous checkpoint stays the newest", result["step"],
                          result["reason"], result["error"])
                self.event("checkpoint_failed", **result)
                continue
            log.info("saved checkpoint step %d (%s): %.1f MB in %.2f s (stall %.2f s)",
                     result["step"], result["reason"], result["bytes"] / 1e6, result["seconds"],
                     result["stall_s"])
            self.event("checkpoint_saved", **result)
        return failed

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
        self.event("save_deadline_risk", step=step, expected_save_s=expected, time_left_s=left)

    def finish_in_flight(self, last_saved: int) -> int:
        """Collective: wait for the save in flight; the step of the newest complete checkpoint
        if a save failed on any rank, else `last_saved`."""
        self.checkpoints.wait()
        failed, = self.dist.any([self.report_saves()])
        return min(last_saved, self.last_complete()) if failed else last_saved

    def last_complete(self) -> int:
        """The newest step with a complete checkpoint (after a failed background save)."""
        from .paths import complete_checkpoint_steps
        steps = complete_checkpoint_steps(self.checkpoints.paths.checkpoints)
        return self.dist.broadcast_object(steps[-1] if steps and self.dist.is_main else 0)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, start_step: int, train_time_s: float = 0.0, samples_seen: int | None = None) -> int:
        """Train from `start_step` to the end. Returns 0 when finished, the preemption code if not.

        `samples_seen` is the data position (default: start_step global batches)."""
        total = self.cfg.train.steps
        every_steps = self.cfg.checkpoint.every_steps
        every_s = self.cfg.checkpoint.every_min * 60
        self.train_time_s = train_time_s
        self.samples_seen = start_step * self.layout.global_batch if samples_seen is None \
            else samples_seen
        last_saved = start_step
        step = start_step
        tokens_per_step = self.layout.global_batch * self.cfg.data.seq_len
        while True:
            time_due = every_s > 0 and time.time() - self.last_save_time >= every_s
            preempt, time_due, failed = self.dist.any([self.flag.is_set, time_due,
                                                        self.report_saves()])
            if failed:
                last_saved = min(last_saved, self.last_complete())
            if preempt:
                self.event("signal", step=step, signal=self.flag.name,
                           received_at=self.flag.received_at)
                log.warning("preemption signal %s: saving at step %d and exiting with %d",
                            self.flag.name or "(on another rank)", step,
                            self.cfg.preemption.exit_code)
                self.warn_if_save_may_not_fit(step)
                last_saved = self.finish_in_flight(last_saved)
                if step > last_saved:
                    self.save(step, reason="preemption", wait=True)
                self.report_saves()
                self.event("preempted", step=step, exit_code=self.cfg.preemption.exit_code)
                self.dist.barrier()  # leave together: srun stops the others when one rank exits
                return self.cfg.preemption.exit_code
            if step >= total:
                break
            if time_due and step > last_saved and self.save(step, reason="interval_min"):
                last_saved = step
            started = time.perf_counter()
            loss, lr = self.train_step(step)
            elapsed = time.perf_counter() - started
            self.train_time_s += elapsed
            self.samples_seen += self.layout.global_batch
            step += 1
            record = {"step": step, "loss": loss, "lr": lr, "world_size": self.dist.world_size,
                      "restart": self.info.restart, "time": time.time(), "step_time_s": elapsed,
                      "tokens_per_s": tokens_per_step / elapsed,
                      "samples_per_s": self.layout.global_batch / elapsed,
                      "micro_batch": self.layout.micro_batch, "accum": self.layout.accum,
                      "job_id": self.info.job_id}
            if self.dist.device.type == "cuda":
                record["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            self.metrics.write(record)
            if step % self.cfg.train.log_every == 0 or step == total:
                log.info("step %d/%d loss %.4f lr %.3e %.0f tok/s", step, total, loss, lr,
                         tokens_per_step / elapsed)
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; lower train.lr or check "
                                         "the data")
            if (every_steps and step % every_steps == 0 and step < total
                    and self.save(step, reason="interval_steps")):
                last_saved = step
        last_saved = self.finish_in_flight(last_saved)
        if step > last_saved:
            self.save(step, reason="final", wait=True)
        self.report_saves()
        self.event("finished", step=step)
        log.info("run finished at step %d", step)
        self.dist.barrier()
        return FINISHED
