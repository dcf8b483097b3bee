"""The run-directory contract: every event of `events.jsonl`, every column of `metrics.jsonl`,
and the records that travel through them (a save's result, an allocation's end). Pure.

Everything that writes or reads those files uses the names here; `Stamp.record` is the one place
that stamps an event with its time, restart, job id and world size. docs/run-directory.md
documents every event of `EVENTS` (a test keeps the two in step).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class Event(StrEnum):
    """The `event` field of a line of events.jsonl."""

    LAUNCH = "launch"
    START = "start"
    RESUME = "resume"
    CHECKPOINT_REJECTED = "checkpoint_rejected"
    CONFIG_FORCED = "config_forced"
    WORLD_SIZE_CHANGED = "world_size_changed"
    CHECKPOINT_STARTED = "checkpoint_started"
    CHECKPOINT_SAVED = "checkpoint_saved"
    CHECKPOINT_FAILED = "checkpoint_failed"
    CHECKPOINT_SKIPPED = "checkpoint_skipped"
    OOM_RECOVERED = "oom_recovered"
    OOM = "oom"
    HANG = "hang"
    NODE_LOST = "node_lost"
    SIGNAL = "signal"
    SAVE_DEADLINE_RISK = "save_deadline_risk"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    ERROR = "error"
    ALLOCATION_END = "allocation_end"
    REQUEUE = "requeue"
    REQUEUE_REFUSED = "requeue_refused"
    TRACKING = "tracking"
    TRACKER_FAILED = "tracker_failed"
    BEST_CHECKPOINT = "best_checkpoint"
    EVAL_STOPPED = "eval_stopped"
    MIRROR_UPLOADED = "mirror_uploaded"
    MIRROR_FAILED = "mirror_failed"
    MIRROR_UNFINISHED = "mirror_unfinished"
    MIRROR_FETCHED = "mirror_fetched"
    MIRROR_REJECTED = "mirror_rejected"


STAMP_FIELDS = ("time", "restart", "job_id", "world_size")
"""Fields of every event (world_size is null where the writer does not know it)."""

EVENTS: dict[Event, tuple[str, str]] = {
    Event.LAUNCH: ("an allocation's ranks started and took the run lock; the placement",
                   "launcher, slurm_restart_count, device, micro_batch, accum, global_batch, "
                   "offload, plan_mem_gib, gpu_mem_gib, plan_notes, pid, host, stdout, stderr"),
    Event.START: ("a new run: no checkpoint to resume from", "step, parameters, trainable"),
    Event.RESUME: ("resumed from a verified checkpoint",
                   "step, checkpoint, verify_s, load_s, files_read_once"),
    Event.CHECKPOINT_REJECTED: ("a checkpoint failed verification or is incomplete; the run "
                                "falls back to an older one", "checkpoint, problems"),
    Event.CONFIG_FORCED: ("resumed with --force despite trajectory changes", "changes"),
    Event.WORLD_SIZE_CHANGED: ("the checkpoint was written by another world size; a universal "
                               "copy is used", "step, from_world_size, to_world_size, cached, "
                               "then verify_s (cached) or convert_s, hash_s, bytes (converted), "
                               "rebuilt_after (a damaged cache)"),
    Event.CHECKPOINT_STARTED: ("a save began (the snapshot)", "step, reason"),
    Event.CHECKPOINT_SAVED: ("a save is complete: its manifest is durable",
                             "step, reason, checkpoint, stall_s, write_s, persist_s, seconds, "
                             "durable_s, bytes, files, GB_per_s, copy_s"),
    Event.CHECKPOINT_FAILED: ("a save failed (disk full, I/O error); its directory is removed",
                              "step, reason, checkpoint, stall_s, write_s, persist_s, seconds, "
                              "error, copy_s"),
    Event.CHECKPOINT_SKIPPED: ("a save was not started: the checkpoint would not fit on disk",
                               "step, reason, free_bytes, needed_bytes"),
    Event.OOM_RECOVERED: ("an out-of-memory step was retried with a smaller micro-batch",
                          "step, micro_batch, accum, previous_micro_batch, previous_accum"),
    Event.OOM: ("a rank ran out of memory beside other ranks: it carried a smaller micro-batch to "
                "the next allocation and left (exit 76)",
                "step, rank, micro_batch, accum, next_micro_batch, next_accum, error"),
    Event.HANG: ("a rank's watchdog saw no step and no save progress for train.hang_timeout_s: "
                 "stacks in its log, exit 124",
                 "step, rank, where, frame, idle_s, allowance_s, pid, host"),
    Event.NODE_LOST: ("a rank saw another node of the job write no heartbeat for "
                      "train.node_timeout_s and left (exit 79)",
                      "lost_host, silent_s, timeout_s, beats_seen, rank, step, host, pid"),
    Event.SIGNAL: ("the ranks agreed on a preemption signal at a step boundary",
                   "step, signal, received_at"),
    Event.SAVE_DEADLINE_RISK: ("recent saves took longer than SLURM leaves the job",
                               "step, expected_save_s, time_left_s"),
    Event.PREEMPTED: ("saved after a signal; the process exits with preemption.exit_code",
                      "step, exit_code, heard (per rank: host, the signal it received or null)"),
    Event.FINISHED: ("the run reached train.steps", "step"),
    Event.ERROR: ("the training process failed", "error, message"),
    Event.ALLOCATION_END: ("the requeue step (job script, launch teardown, local rank 0) saw the "
                           "allocation end",
                           "exit_code, srun_exit_code, checkpoint_step, slurm_restart_count"),
    Event.REQUEUE: ("the job requeued itself (scontrol requeue; exit 144 under submitit's local "
                    "executor)",
                    "exit_code, srun_exit_code, checkpoint_step, slurm_restart_count, cause, "
                    "reason, signal"),
    Event.REQUEUE_REFUSED: ("the job was not requeued (bad input, restart cap, crash loop)",
                            "exit_code, srun_exit_code, checkpoint_step, slurm_restart_count, "
                            "cause, reason, signal"),
    Event.TRACKING: ("rank 0's relay opened a tracker run for this allocation (track:)",
                     "tracker, where, hwm, eval_hwm, resume_step, skipped"),
    Event.TRACKER_FAILED: ("a tracker raised: dropped for the rest of the allocation; the next "
                           "one sends what it missed", "tracker, error"),
    Event.BEST_CHECKPOINT: ("an evaluation improved on the best eval_loss so far: this step's "
                            "checkpoint is the best (checkpoint.keep_best keeps it)",
                            "step, eval_loss, previous_step, previous_eval_loss"),
    Event.EVAL_STOPPED: ("a preemption signal came during an evaluation: it stopped unfinished "
                         "and is done again after the resume", "step, signal"),
    Event.MIRROR_UPLOADED: ("a checkpoint is complete on the mirror (checkpoint.mirror): every "
                            "file read back and verified, its manifest uploaded last",
                            "checkpoint, step, bytes, uploaded_bytes, uploaded_files, seconds"),
    Event.MIRROR_FAILED: ("uploads to the mirror are failing; retried with backoff, training "
                          "goes on (reported at the first failure, then at most once a minute)",
                          "url, error, failures, failing_s, retry_in_s"),
    Event.MIRROR_UNFINISHED: ("the process ended before the mirror had every wanted checkpoint; "
                              "the next allocation goes on with it", "url, budget_s, wanted"),
    Event.MIRROR_FETCHED: ("no valid local checkpoint as new as the mirror's: it was downloaded "
                           "and verified", "checkpoint, step, bytes, seconds"),
    Event.MIRROR_REJECTED: ("a mirrored checkpoint did not match its manifest when downloaded; "
                            "the previous one is tried", "checkpoint, problems"),
}
"""What each event means and the fields it carries beyond the stamp."""

METRICS_FIELDS = ("step", "loss", "lr", "world_size", "micro_batch", "accum", "restart", "time",
                  "step_time_s", "tokens_per_s", "samples_per_s", "job_id", "grad_norm",
                  "gpu_mem_peak_gb")
"""Columns of a metrics.jsonl line (one per optimizer step; gpu_mem_peak_gb on CUDA only)."""

EVAL_FIELDS = ("step", "eval_loss", "eval_tokens", "eval_rows", "eval_s", "world_size", "restart",
               "time", "job_id")
"""Columns of an evaluation's metrics.jsonl line (eval.every_steps; it has no `loss`)."""


def is_train_row(row: Mapping[str, Any]) -> bool:
    """A training line of metrics.jsonl: a step and its `loss`."""
    return "step" in row and "loss" in row


def is_eval_row(row: Mapping[str, Any]) -> bool:
    """An evaluation line of metrics.jsonl: a step and its `eval_loss` (no `loss`)."""
    return "step" in row and "eval_loss" in row and "loss" not in row


@dataclass(frozen=True)
class Stamp:
    """Who writes: the allocation's restart index, the job, and the world size."""

    restart: int
    job_id: str | None
    world_size: int | None = None

    def record(self, event: Event, now: float | None = None, **fields: Any) -> dict[str, Any]:
        """One line of events.jsonl: the event, its stamp, and its fields."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}: add it to telepathy.core.events.EVENTS")
        return {"event": str(event), "time": time.time() if now is None else now,
                "restart": self.restart, "job_id": self.job_id, "world_size": self.world_size,
                **fields}


def of_kind(records: list[Mapping[str, Any]], *kinds: Event) -> list[Mapping[str, Any]]:
    """The records of these kinds, in order."""
    return [r for r in records if r.get("event") in kinds]


def launches(records: list[Mapping[str, Any]]) -> int:
    """How many allocations have started: the restart index of the next one."""
    return len(of_kind(records, Event.LAUNCH))


@dataclass(frozen=True)
class SaveResult:
    """How one save ended: the fields of a checkpoint_saved or checkpoint_failed event."""

    step: int
    reason: str
    checkpoint: str
    stall_s: float
    write_s: float
    persist_s: float = 0.0
    seconds: float = 0.0
    durable_s: float | None = None
    """From the start of the save until its manifest was durable (what a grace time must cover);
    `seconds` adds the pruning of older checkpoints after it."""
    bytes: int | None = None
    files: int | None = None
    GB_per_s: float | None = None
    error: str | None = None
    copy_s: float | None = None
    """Of the stall, the copies into host memory (the rest: DeepSpeed's walk and collectives)."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def event(self) -> Event:
        return Event.CHECKPOINT_SAVED if self.ok else Event.CHECKPOINT_FAILED

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class AllocationEnd:
    """How one allocation of a SLURM job ended (an allocation_end event)."""

    exit_code: int
    checkpoint_step: int
    """Newest complete checkpoint when it ended (0: none)."""
    srun_exit_code: int | None = None
    slurm_restart_count: int = 0

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AllocationEnd:
        return cls(int(record["exit_code"]), int(record.get("checkpoint_step", 0)),
                   record.get("srun_exit_code"), int(record.get("slurm_restart_count", 0)))

    def fields(self) -> dict[str, Any]:
        return asdict(self)


def allocation_ends(records: list[Mapping[str, Any]]) -> list[AllocationEnd]:
    return [AllocationEnd.from_record(r) for r in of_kind(records, Event.ALLOCATION_END)]
