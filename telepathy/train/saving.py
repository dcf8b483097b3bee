"""When to save: pure decisions, one right after each optimizer step and one at each step
boundary, from what all ranks agreed on.

Right after step N, `step_save` says whether N is a `checkpoint.every_steps` step to save; it is
taken before the ranks next agree, so a signal that arrives while its snapshot is taken is
answered at this same step, with no step and no save more. Then, at the boundary, `decide` says:
a signal means save (if the step is not saved yet) and leave for requeue; the last step means
save and finish; otherwise a save is due every `checkpoint.every_min` minutes. Never two saves
of one step. Preemption and final saves are synchronous (the process exits after them);
interval saves finish in the background.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    TRAIN = "train"
    """Train the next step (after starting the save, if there is one)."""
    PREEMPT = "preempt"
    """Save (synchronously, if the step is not saved yet) and exit for requeue."""
    FINISH = "finish"
    """The run is done: save (synchronously, if needed) and exit 0."""


class Reason(StrEnum):
    """Why a checkpoint is saved (the `reason` of its events)."""

    INTERVAL_STEPS = "interval_steps"
    INTERVAL_MIN = "interval_min"
    PREEMPTION = "preemption"
    FINAL = "final"
    BEST = "best"


@dataclass(frozen=True)
class Boundary:
    """The state of the run between two optimizer steps."""

    step: int
    """Optimizer steps done."""
    total: int
    """train.steps."""
    last_saved: int
    """Step of the newest checkpoint, complete or being written (the start step after a resume)."""
    preempt: bool = False
    """A preemption signal came (to any rank)."""
    time_due: bool = False
    """checkpoint.every_min minutes have passed since the last save (on any rank)."""


@dataclass(frozen=True)
class Decision:
    action: Action
    save: Reason | None = None
    """Save this step first, for this reason; None: no save."""

    @property
    def wait(self) -> bool:
        """Whether the save must be durable before going on (the process exits after it)."""
        return self.action is not Action.TRAIN


def decide(b: Boundary) -> Decision:
    unsaved = b.step > b.last_saved
    if b.preempt:
        return Decision(Action.PREEMPT, Reason.PREEMPTION if unsaved else None)
    if b.step >= b.total:
        return Decision(Action.FINISH, Reason.FINAL if unsaved else None)
    if unsaved and b.time_due:
        return Decision(Action.TRAIN, Reason.INTERVAL_MIN)
    return Decision(Action.TRAIN)


def step_save(step: int, total: int, last_saved: int, every_steps: int) -> Reason | None:
    """Right after optimizer step `step`: save it now if it is a checkpoint.every_steps step
    (not the last one: that is the final save) and not saved yet."""
    if every_steps and step % every_steps == 0 and last_saved < step < total:
        return Reason.INTERVAL_STEPS
    return None


def best_save(step: int, total: int, last_saved: int, improved: bool) -> Reason | None:
    """Right after an evaluation that improved on the best (checkpoint.keep_best): save this
    step so that the best is on disk; the last step's final save covers it there."""
    return Reason.BEST if improved and last_saved < step < total else None


def eval_due(step: int, total: int, every_steps: int, last_evaluated: int) -> bool:
    """Whether the evaluation of step `step` is due: every eval.every_steps steps and after
    the last, once (again after a resume whose checkpoint was saved before it finished)."""
    return every_steps > 0 and step > last_evaluated and (step % every_steps == 0 or
                                                          step == total)


def time_due(now: float, last_save_time: float, every_min: float) -> bool:
    """Whether a time-based save is due (checkpoint.every_min; 0 turns them off)."""
    return every_min > 0 and now - last_save_time >= every_min * 60
