"""The requeue policy, table-driven, on the scontrol fields measured on SLURM 22.05."""

import pytest

from telepathy.core.events import AllocationEnd, allocation_ends
from telepathy.slurm.policy import (
    classify_cause,
    decide,
    effective_exit,
    parse_time,
    this_allocation,
)

NOW = parse_time("2026-11-23T02:50:55")
# As printed by `scontrol show job -o` inside the signal handler (see docs/slurm.md, 'Who gets the signal').
SCANCEL = {"JobState": "RUNNING", "StartTime": "2026-11-23T02:50:43",
           "EndTime": "2026-11-23T02:55:43", "TimeLimit": "00:05:00", "PreemptTime": "None"}
PREEMPTED = {"JobState": "SIGNALING", "StartTime": "2026-11-23T02:50:50",
             "EndTime": "2026-11-23T02:51:55", "TimeLimit": "00:05:00",
             "PreemptTime": "2026-11-23T02:50:55"}
TIME_LIMIT = {"JobState": "RUNNING", "StartTime": "2026-11-23T02:46:50",
              "EndTime": "2026-11-23T02:52:50", "TimeLimit": "00:06:00", "PreemptTime": "None"}


@pytest.mark.parametrize("fields, cause", [(SCANCEL, "user"), (PREEMPTED, "preemption"),
                                           (TIME_LIMIT, "time_limit"), ({}, "user")])
def test_classify_cause(fields, cause):
    assert classify_cause(fields, NOW, signal_lead_s=120) == cause


def test_allocations_are_read_from_allocation_end_events():
    events = [{"event": "launch"}, {"event": "allocation_end", "exit_code": 75, "checkpoint_step": 23},
              {"event": "resume", "step": 23}, {"event": "allocation_end", "exit_code": 1}]
    assert allocation_ends(events) == [AllocationEnd(75, 23), AllocationEnd(1, 0)]


A = AllocationEnd
# Preempted at 30, then three crashes that never got past the checkpoint of step 30.
STUCK = [A(75, 30), A(1, 30), A(137, 30), A(1, 30)]
# Crashing every time, but each allocation saved a newer checkpoint first.
PROGRESSING = [A(1, 20), A(137, 40), A(1, 60)]


@pytest.mark.parametrize("history, restarts, limit, requeue, reason", [
    ([A(0, 60)], 0, 3, False, "finished"),
    ([A(2, 0)], 0, 3, False, "bad input"),
    ([A(75, 17)], 0, 3, True, "saved after a signal"),
    ([A(75, 17)], 50, 3, False, "restart cap reached: SLURM_RESTART_COUNT=50 >= preemption.max_restarts=50"),
    (STUCK[:2], 1, 3, True, "crashed with exit 1; requeueing to resume from the checkpoint of step 30"),
    (STUCK, 3, 3, False, "crash loop: the last 3 allocations all failed without getting past the "
                         "checkpoint of step 30"),
    (STUCK, 3, 4, True, "crashed"),
    (PROGRESSING, 2, 3, True, "crashed"),
    ([A(1, 0), A(1, 0)], 1, 2, False, "crash loop"),  # dies before any checkpoint, every time
])
def test_decide(history, restarts, limit, requeue, reason):
    d = decide(history, restarts, max_restarts=50, crash_loop_limit=limit, preempt_code=75)
    assert d.requeue is requeue and reason in d.reason


def test_the_allocation_is_judged_by_its_own_events_not_by_srun():
    events = [{"event": "launch", "job_id": "7", "slurm_restart_count": 0},
              {"event": "signal", "step": 30}, {"event": "checkpoint_saved", "step": 30},
              {"event": "allocation_end", "exit_code": 75},
              {"event": "launch", "job_id": "7", "slurm_restart_count": 1},
              {"event": "signal", "step": 41}, {"event": "preempted", "step": 41}]
    mine = this_allocation(events, "7", 1)
    assert mine == events[4:]
    # rank 1 left with 75 first; srun then terminated rank 0 and reported 143
    assert effective_exit(143, mine, 75) == 75
    assert effective_exit(0, mine + [{"event": "finished"}], 75) == 0
    # an allocation that died before its own launch event keeps srun's status
    assert this_allocation(events, "7", 2) == []
    assert effective_exit(1, this_allocation(events, "7", 2), 75) == 1
    # a launcher without SLURM's restart count (submitit's local executor): the last launch of
    # the job, and nothing when the last launch belongs to another job
    assert this_allocation(events, "7", None) == events[4:]
    assert this_allocation(events, "local-9", None) == []


def test_an_allocation_that_died_before_its_launch_is_judged_by_its_own_exit(tmp_path):
    """submitit's local executor has no restart count: a run that failed before writing its own
    launch event must not inherit the previous run's clean save (and be restarted as one)."""
    import json

    from telepathy.config import load_config
    from telepathy.core.paths import RunPaths
    from telepathy.slurm.requeue import end_allocation
    from tests.support import CONFIG

    before = [{"event": "launch", "job_id": "local-1", "slurm_restart_count": 0, "restart": 0},
              {"event": "signal", "step": 30, "job_id": "local-1", "restart": 0},
              {"event": "preempted", "step": 30, "job_id": "local-1", "restart": 0}]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in before))
    cfg = load_config(CONFIG)
    died = end_allocation(cfg, RunPaths.at(tmp_path), "local-1", 1, 2, lambda _: "user",
                          launched=False)
    assert died.exit_code == 2 and not died.decision.requeue and "bad input" in died.decision.reason
    saved = end_allocation(cfg, RunPaths.at(tmp_path), "local-1", 0, 75, lambda _: "user",
                           launched=True)
    assert saved.exit_code == 75 and saved.decision.requeue


def test_job_states_count_as_ended_only_when_final():
    from telepathy.launch.adapter import StateWatcher

    w = StateWatcher()
    for state, done in [("COMPLETED", True), ("CANCELLED by 0", True), ("FAILED", True),
                        ("GONE", True), ("RUNNING", False), ("PENDING", False),
                        ("SUSPENDED", False), ("REQUEUE_HOLD", False), ("PREEMPTED", False),
                        ("CONFIGURING", False), ("", False)]:
        w._info_dict["7"] = {"State": state}
        w._registered.add("7")
        assert w.is_done("7", mode="cache") is done, state
