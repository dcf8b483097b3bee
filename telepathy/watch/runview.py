"""What a run directory says about its run: progress, losses, evaluations, restarts and why,
checkpoints.

Pure: records (already read from metrics.jsonl, events.jsonl, system-*.jsonl) in, a summary out.
Both `telepathy tail` and `telepathy report` are views of this.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.events import Event, is_eval_row, is_train_row, of_kind

SPARK = "▁▂▃▄▅▆▇█"
RECENT = 20


@dataclass
class Allocation:
    """One launch of the training: where it started and stopped, and why it ended."""

    index: int
    job_id: str | None
    started_at: float
    start_step: int
    end_step: int
    ended: str
    """finished, preemption, time_limit, user, signal SIGxxx, error, running, or unknown."""
    resumed_from: str | None = None


@dataclass
class RunView:
    state: str
    """running, requeued, finished, failed, stopped, stale, or new."""
    step: int
    total_steps: int | None
    loss: float | None
    loss_first: float | None
    loss_best: tuple[int, float] | None
    lr: float | None
    tokens_per_s: float | None
    step_time_s: float | None
    eta_s: float | None
    restarts: int
    allocations: list[Allocation]
    last_checkpoint: tuple[int, float] | None
    """(step, time it was saved) of the newest checkpoint_saved event."""
    checkpoint_saves: list[dict[str, Any]]
    last_update: float | None
    job_id: str | None
    system: dict[str, Any] | None
    loss_trend: list[float] = field(default_factory=list)
    markers: list[dict[str, Any]] = field(default_factory=list)
    """Steps where the run was stopped (preempted) and resumed, for plots."""
    warnings: list[str] = field(default_factory=list)
    trackers: dict[str, str] = field(default_factory=dict)
    mirror: dict[str, Any] | None = None
    """checkpoint.mirror's state from its events: the newest checkpoint uploaded, and whether
    uploads are failing (since when, the error) or were left unfinished; None: no mirror."""
    """Where each tracker's run is (track:), from the relay's `tracking` events; a tracker that
    failed in the newest allocation says so."""
    evals: list[tuple[int, float]] = field(default_factory=list)
    """(step, eval_loss) of every evaluated step (its last evaluation line), in step order."""
    eval_loss: tuple[int, float] | None = None
    """The newest evaluation: (step, eval_loss)."""
    eval_best: tuple[int, float] | None = None
    """The lowest eval_loss and its step (the earliest of equals)."""
    best_checkpoint: int | None = None
    """The step of the newest best_checkpoint event (checkpoint.keep_best keeps it)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] for v in values)


def _ending(events: list[dict[str, Any]]) -> str:
    """How one allocation's events end."""
    kinds = [e.get("event") for e in events]
    requeue = of_kind(events, Event.REQUEUE, Event.REQUEUE_REFUSED)
    if Event.FINISHED in kinds:
        return "finished"
    if requeue and requeue[-1].get("cause"):
        return requeue[-1]["cause"]
    if Event.PREEMPTED in kinds:
        signal = next((e.get("signal") for e in of_kind(events, Event.SIGNAL)), None)
        return f"signal {signal}" if signal else "signal"
    if Event.HANG in kinds:
        return "hung (rank {})".format(of_kind(events, Event.HANG)[0].get("rank"))
    if Event.OOM in kinds:
        return "out of memory (rank {})".format(of_kind(events, Event.OOM)[0].get("rank"))
    if Event.ERROR in kinds or any(e.get("exit_code") not in (None, 0) for e in requeue):
        return "error"
    return "running"


def allocations(events: list[dict[str, Any]], metrics: list[dict[str, Any]] = ()) -> list[Allocation]:
    """Launches in order; an allocation's last step is the last metric it logged (its `restart`)."""
    last_logged: dict[int, int] = {}
    for r in metrics:
        if "restart" in r and "step" in r:
            last_logged[r["restart"]] = max(last_logged.get(r["restart"], 0), int(r["step"]))
    groups: list[list[dict[str, Any]]] = []
    for e in events:
        if e.get("event") == Event.LAUNCH:
            groups.append([e])
        elif groups:
            groups[-1].append(e)
    out = []
    for i, group in enumerate(groups):
        start = next(iter(of_kind(group, Event.START, Event.RESUME)), None)
        start_step = int(start.get("step", 0)) if start else 0
        steps = [int(e["step"]) for e in group if "step" in e]
        ended = _ending(group)
        if ended == "running" and i < len(groups) - 1:
            ended = "unknown"  # a later launch exists: this one died without a word
        end_step = last_logged.get(i, max(steps, default=start_step))
        out.append(Allocation(i, group[0].get("job_id"), group[0].get("time", 0.0), start_step,
                              max(end_step, start_step), ended,
                              start.get("checkpoint") if start else None))
    return out


def evaluations(metrics: list[dict[str, Any]], events: list[dict[str, Any]]) -> dict[str, Any]:
    """The RunView fields of the evaluations: each step's last evaluation line wins (a step is
    evaluated again after a crash, or after a resume that stopped its evaluation)."""
    evals = sorted({int(r["step"]): r["eval_loss"] for r in metrics if is_eval_row(r)}.items())
    best = of_kind(events, Event.BEST_CHECKPOINT)
    return {"evals": evals, "eval_loss": evals[-1] if evals else None,
            "eval_best": min(evals, key=lambda e: e[1]) if evals else None,
            "best_checkpoint": best[-1].get("step") if best else None}


def summarize(config: dict[str, Any] | None, metrics: list[dict[str, Any]],
              events: list[dict[str, Any]], system: list[dict[str, Any]], now: float,
              stale_after_s: float = 600.0) -> RunView:
    # Training lines only (an evaluation's line has no loss); the last line of a step wins.
    by_step = {int(r["step"]): r for r in metrics if is_train_row(r)}
    steps = sorted(by_step)
    recent = [by_step[s] for s in steps[-RECENT:]]
    allocs = allocations(events, metrics)
    total = (config or {}).get("train", {}).get("steps")
    step = steps[-1] if steps else 0
    step_time = statistics.median(r["step_time_s"] for r in recent) if recent else None
    losses = [(s, by_step[s]["loss"]) for s in steps]
    saves = of_kind(events, Event.CHECKPOINT_SAVED)
    relay = (Event.TRACKING, Event.TRACKER_FAILED)  # the tracker relay's, not the run's
    run_events = [e for e in events if e.get("event") not in relay]
    updates = [r.get("time", 0.0) for r in metrics[-1:]] + \
        [e.get("time", 0.0) for e in run_events[-1:]]
    last_update = max(updates) if updates else None
    markers = [{"step": a.end_step, "kind": "stopped", "cause": a.ended, "allocation": a.index}
               for a in allocs if a.ended not in ("finished", "running")]
    markers += [{"step": a.start_step, "kind": "resumed", "allocation": a.index} for a in allocs[1:]]
    markers.sort(key=lambda m: (m["step"], m["kind"] != "stopped"))
    kinds = [e.get("event") for e in run_events]
    if not allocs:
        state = "new"
    elif Event.REQUEUE_REFUSED in kinds[-3:]:
        state = "stopped"
    elif allocs[-1].ended == "finished":
        state = "finished"
    elif allocs[-1].ended == "error":
        state = "failed"
    elif allocs[-1].ended != "running":
        state = "requeued"
    elif last_update is not None and now - last_update > stale_after_s:
        state = "stale"
    else:
        state = "running"
    warnings = [f"no update for {now - last_update:.0f} s"] if state == "stale" else []
    mirror = mirror_state(events)
    if mirror and mirror.get("failing"):
        warnings.append(f"mirror uploads failing since {mirror['failing']['since']:.0f} "
                        f"({mirror['failing']['failures']} attempts): {mirror['failing']['error']}")
    if mirror and mirror.get("unfinished"):
        warnings.append("the mirror lacks " + ", ".join(mirror["unfinished"]) + " (the last "
                        "allocation left the upload unfinished; the next one goes on with it)")
    last_system = next((s for s in reversed(system) if "cpu_pct" in s), None)
    trackers = {e["tracker"]: str(e.get("where")) for e in of_kind(events, Event.TRACKING)}
    newest = allocs[-1].index if allocs else None
    for e in of_kind(events, Event.TRACKER_FAILED):
        if e.get("restart") == newest and e.get("tracker") in trackers:
            trackers[e["tracker"]] += f" (failed in this allocation: {e.get('error')})"
    return RunView(
        trackers=trackers,
        state=state, step=step, total_steps=total,
        loss=losses[-1][1] if losses else None, loss_first=losses[0][1] if losses else None,
        loss_best=min(losses, key=lambda x: x[1]) if losses else None,
        lr=recent[-1].get("lr") if recent else None,
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in recent) if recent else None,
        step_time_s=step_time,
        eta_s=(total - step) * step_time if total and step_time is not None else None,
        restarts=max(0, len(allocs) - 1), allocations=allocs,
        last_checkpoint=(saves[-1]["step"], saves[-1]["time"]) if saves else None,
        checkpoint_saves=[{k: e.get(k) for k in ("step", "reason", "bytes", "seconds")}
                          for e in saves],
        last_update=last_update, job_id=allocs[-1].job_id if allocs else None,
        system=last_system, loss_trend=[loss for _, loss in losses[-40:]], markers=markers,
        warnings=warnings, mirror=mirror, **evaluations(metrics, events))


MIRROR_EVENTS = (Event.MIRROR_UPLOADED, Event.MIRROR_FAILED, Event.MIRROR_UNFINISHED,
                 Event.MIRROR_FETCHED, Event.MIRROR_REJECTED)


def mirror_state(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The mirror's state: the newest upload, a failing streak (mirror_failed after the last
    upload), an unfinished upload (mirror_unfinished after it), fetches at starts."""
    seen = [e for e in events if e.get("event") in MIRROR_EVENTS]
    if not seen:
        return None
    uploads = of_kind(seen, Event.MIRROR_UPLOADED)
    last_ok = uploads[-1]["time"] if uploads else float("-inf")
    failed = [e for e in of_kind(seen, Event.MIRROR_FAILED) if e.get("time", 0) > last_ok]
    unfinished = [e for e in of_kind(seen, Event.MIRROR_UNFINISHED) if e.get("time", 0) > last_ok]
    return {
        "uploaded": {k: uploads[-1].get(k) for k in ("step", "checkpoint", "time", "seconds")}
        if uploads else None,
        "uploads": len(uploads),
        "failing": {"since": failed[0]["time"], "failures": failed[-1].get("failures"),
                    "error": failed[-1].get("error")} if failed else None,
        "unfinished": unfinished[-1].get("wanted") if unfinished else None,
        "fetched": [{k: e.get(k) for k in ("checkpoint", "step", "time")}
                    for e in of_kind(seen, Event.MIRROR_FETCHED)],
        "rejected": [{k: e.get(k) for k in ("checkpoint", "problems")}
                     for e in of_kind(seen, Event.MIRROR_REJECTED)]}
