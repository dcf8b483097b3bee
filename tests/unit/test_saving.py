"""When to save, as tables: the pure decisions the trainer takes after every step and at every
step boundary."""

import pytest

from telepathy.train.saving import Action, Boundary, Decision, Reason, decide, step_save, time_due

A, R = Action, Reason


@pytest.mark.parametrize("step, total, last_saved, every_steps, expected", [
    (19, 60, 0, 20, None),
    (20, 60, 0, 20, R.INTERVAL_STEPS),
    (40, 60, 20, 20, R.INTERVAL_STEPS),
    (20, 60, 20, 20, None),      # saved already (a preemption save of the same step)
    (20, 60, 0, 0, None),        # step-based saves off
    (60, 60, 40, 20, None),      # the last step gets the final save instead
    (0, 60, 0, 20, None),
])
def test_step_save(step, total, last_saved, every_steps, expected):
    assert step_save(step, total, last_saved, every_steps) == expected


@pytest.mark.parametrize("boundary, expected", [
    # (steps done, total, last saved, signal, time due)
    (Boundary(0, 60, 0), Decision(A.TRAIN)),
    (Boundary(20, 60, 0), Decision(A.TRAIN)),                          # step saves: step_save
    (Boundary(7, 60, 0, time_due=True), Decision(A.TRAIN, R.INTERVAL_MIN)),
    (Boundary(7, 60, 7, time_due=True), Decision(A.TRAIN)),             # this step is saved
    (Boundary(7, 60, 0, preempt=True), Decision(A.PREEMPT, R.PREEMPTION)),
    (Boundary(20, 60, 20, preempt=True), Decision(A.PREEMPT)),          # saved (or saving): go
    (Boundary(0, 60, 0, preempt=True), Decision(A.PREEMPT)),            # signal before step 1
    (Boundary(60, 60, 0, preempt=True), Decision(A.PREEMPT, R.PREEMPTION)),  # signal wins
    (Boundary(60, 60, 40), Decision(A.FINISH, R.FINAL)),
    (Boundary(60, 60, 60), Decision(A.FINISH)),                         # a finished run, re-run
    (Boundary(60, 60, 0, time_due=True), Decision(A.FINISH, R.FINAL)),
])
def test_decide(boundary, expected):
    assert decide(boundary) == expected


def test_only_leaving_saves_wait_for_durability():
    assert not Decision(A.TRAIN, R.INTERVAL_STEPS).wait
    assert Decision(A.PREEMPT, R.PREEMPTION).wait and Decision(A.FINISH, R.FINAL).wait


@pytest.mark.parametrize("now, last, every_min, due", [
    (1000.0, 1000.0, 0.0, False), (10_000.0, 0.0, 0.0, False),   # off
    (1059.9, 1000.0, 1.0, False), (1060.0, 1000.0, 1.0, True), (1000.0, 0.0, 15.0, True),
])
def test_time_due(now, last, every_min, due):
    assert time_due(now, last, every_min) is due
