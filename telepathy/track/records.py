"""What the trackers get from the run's files: scalars of a metrics line (a training step's or an
evaluation's), notes of the events that an operator wants to see on a curve, scalars of a save
and of a health sample. Pure."""

from __future__ import annotations

from typing import Any

from ..core.events import Event

STEP_SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "tokens_per_s": "train/tokens_per_s", "step_time_s": "train/step_s",
                "restart": "run/restarts", "world_size": "run/world_size",
                "micro_batch": "train/micro_batch", "gpu_mem_peak_gb": "train/gpu_mem_peak_gb"}
"""metrics.jsonl column -> tracker key. run/restarts is the index of the allocation that trained
the step: a step function that rises at every requeue."""

EVAL_SCALARS = {"eval_loss": "eval/loss", "eval_tokens": "eval/tokens"}
"""An evaluation line's column -> tracker key, at the step it evaluated."""

NOTED = (Event.START, Event.RESUME, Event.WORLD_SIZE_CHANGED, Event.CHECKPOINT_REJECTED,
         Event.CHECKPOINT_FAILED, Event.CHECKPOINT_SKIPPED, Event.OOM_RECOVERED, Event.OOM,
         Event.HANG, Event.SIGNAL, Event.SAVE_DEADLINE_RISK, Event.PREEMPTED, Event.FINISHED,
         Event.ERROR, Event.REQUEUE, Event.REQUEUE_REFUSED, Event.CONFIG_FORCED,
         Event.BEST_CHECKPOINT, Event.EVAL_STOPPED, Event.MIRROR_FAILED, Event.MIRROR_UNFINISHED,
         Event.MIRROR_FETCHED, Event.MIRROR_REJECTED)
"""Events shown as a text entry at their step."""


def step_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A training line's scalars."""
    return _scalars(row, STEP_SCALARS)


def eval_scalars(row: dict[str, Any]) -> dict[str, float]:
    """An evaluation line's scalars."""
    return _scalars(row, EVAL_SCALARS)


def _scalars(row: dict[str, Any], columns: dict[str, str]) -> dict[str, float]:
    return {key: float(row[col]) for col, key in columns.items()
            if isinstance(row.get(col), (int, float)) and not isinstance(row.get(col), bool)}


def event_step(event: dict[str, Any], current: int) -> int:
    """The step an event belongs to: its own, the checkpoint it names, or the newest trained."""
    for key in ("step", "checkpoint_step"):
        if isinstance(event.get(key), int):
            return event[key]
    return current


def note(event: dict[str, Any]) -> str | None:
    """One line for an event worth a mark on the curve; None for the rest."""
    kind = event.get("event")
    if kind not in NOTED:
        return None
    head = f"allocation {event.get('restart')}: {kind}"
    details = {
        Event.START: lambda e: f"new run, {e.get('trainable', e.get('parameters'))} trainable "
                               f"parameters, world size {e.get('world_size')}",
        Event.RESUME: lambda e: f"from {e.get('checkpoint')} on world size {e.get('world_size')}",
        Event.WORLD_SIZE_CHANGED: lambda e: f"{e.get('from_world_size')} -> "
                                            f"{e.get('to_world_size')} GPUs",
        Event.HANG: lambda e: f"rank {e.get('rank')} idle {e.get('idle_s')} s while "
                              f"{e.get('where')}",
        Event.OOM: lambda e: f"rank {e.get('rank')}; micro-batch {e.get('micro_batch')} -> "
                             f"{e.get('next_micro_batch')}",
        Event.OOM_RECOVERED: lambda e: f"micro-batch {e.get('previous_micro_batch')} -> "
                                       f"{e.get('micro_batch')}",
        Event.SIGNAL: lambda e: f"{e.get('signal')}",
        Event.REQUEUE: lambda e: f"{e.get('cause') or e.get('reason')}",
        Event.REQUEUE_REFUSED: lambda e: f"{e.get('cause') or e.get('reason')}",
        Event.ERROR: lambda e: f"{e.get('error')}: {str(e.get('message'))[:200]}",
        Event.CHECKPOINT_FAILED: lambda e: f"{e.get('checkpoint')}: {e.get('error')}",
        Event.CHECKPOINT_REJECTED: lambda e: f"{e.get('checkpoint')}: {e.get('problems')}",
        Event.BEST_CHECKPOINT: lambda e: f"eval_loss {e.get('eval_loss')}, the best before: "
                                         f"{e.get('previous_eval_loss')} at step "
                                         f"{e.get('previous_step')}",
        Event.EVAL_STOPPED: lambda e: f"{e.get('signal')}: evaluated again after the resume",
        Event.MIRROR_FAILED: lambda e: f"{e.get('url')}: {e.get('error')} (attempt "
                                       f"{e.get('failures')}, retry in {e.get('retry_in_s')} s)",
        Event.MIRROR_UNFINISHED: lambda e: f"left for the next allocation: {e.get('wanted')}",
        Event.MIRROR_FETCHED: lambda e: f"{e.get('checkpoint')} downloaded and verified",
        Event.MIRROR_REJECTED: lambda e: f"{e.get('checkpoint')}: {e.get('problems')}",
    }.get(kind)
    return f"{head} at step {event_step(event, 0)}" + (f" ({details(event)})" if details else "")


def save_scalars(event: dict[str, Any]) -> dict[str, float]:
    """A completed save: its size and how long training stood still and waited for it."""
    if event.get("event") != Event.CHECKPOINT_SAVED:
        return {}
    out = {"checkpoint/bytes": event.get("bytes"), "checkpoint/stall_s": event.get("stall_s"),
           "checkpoint/durable_s": event.get("seconds")}
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def system_scalars(sample: dict[str, Any]) -> dict[str, float]:
    """A health sample (system-<host>.jsonl): host figures and each GPU's."""
    if "cpu_pct" not in sample:
        return {}
    host = sample.get("host", "host")
    out = {f"system/{host}/{k}": float(sample[k])
           for k in ("cpu_pct", "ram_used_gb", "disk_free_gb", "rss_gb")
           if isinstance(sample.get(k), (int, float))}
    for gpu in sample.get("gpus", []):
        for k in ("util_pct", "mem_used_gb", "temp_c", "power_w"):
            if isinstance(gpu.get(k), (int, float)):
                out[f"system/{host}/gpu{gpu.get('index')}/{k}"] = float(gpu[k])
    return out


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The resolved config as `section.key` -> value (lists as text), for hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            out[f"{prefix}{key}"] = ",".join(map(str, value))
        else:
            out[f"{prefix}{key}"] = value
    return out
