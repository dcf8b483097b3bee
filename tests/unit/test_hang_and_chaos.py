"""The pieces of 'never hang' that need no training process: the watchdog's timing and report
(a real thread, with the process exit replaced), how a hang or a one-rank OOM is judged at the
end of an allocation, the carried micro-batch, run-time fault files, and the chaos harness's
loss comparison."""

import os
import threading
import time

import pytest

from telepathy.chaos.harness import compare_losses, harness_sets
from telepathy.config import load_config
from telepathy.core import exits
from telepathy.core.errors import ConfigError
from telepathy.core.events import AllocationEnd
from telepathy.plan.memory import ModelShape
from telepathy.plan.placement import PlanRequest, plan
from telepathy.slurm.policy import decide, effective_exit
from telepathy.testing.faults import FaultPlan
from telepathy.train.heartbeat import NodeHeartbeat, interval_for
from telepathy.train.watchdog import Watchdog
from tests import support


class Clock:
    """A hand-moved monotonic clock: the watchdog's decisions without waiting for them."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds

    def looks(self, dog, seconds):
        """Move on `seconds`, the watchdog looking every `poll_s` as its thread does; whether it
        fired."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + dog.poll_s)
            if dog.check():
                return True
        return False


def watchdog(timeout_s, out=None, clock=time.monotonic, **kw):
    exits_seen, hangs = [], []
    done = threading.Event()

    def exit_(code):
        exits_seen.append(code)
        done.set()

    dog = Watchdog(timeout_s, rank=3, on_hang=hangs.append, out=out, backstop=False,
                   exit=exit_, clock=clock, **kw)
    return dog, exits_seen, hangs, done


def test_the_watchdog_fires_after_the_timeout_without_progress_and_reports_where(tmp_path):
    log = open(tmp_path / "rank.log", "w+")  # faulthandler writes to a file descriptor
    clock = Clock()
    dog, exits_seen, hangs, _ = watchdog(10, out=log, clock=clock)
    dog.expect("training step 8")
    dog.progress(7)
    assert not clock.looks(dog, 10) and not exits_seen  # idle exactly the timeout: not yet
    assert clock.looks(dog, 0.5)
    assert exits_seen == [exits.HUNG]
    hang, = hangs
    assert (hang.rank, hang.step, hang.where) == (3, 7, "training step 8")
    assert (hang.idle_s, hang.allowance_s) == (10.5, 10)
    assert "test_hang_and_chaos.py" in hang.frame  # the main thread is in this test
    log.seek(0)
    stacks = log.read()
    assert "most recent call first" in stacks and "in _fire" in stacks  # every thread's stack


def test_the_watchdog_thread_looks_by_itself():
    dog, exits_seen, hangs, done = watchdog(10)
    dog.timeout_s = dog.allowance_s = 0.2  # (the config refuses < 10 s; the thread does not)
    dog.poll_s = 0.02
    dog.progress(4)
    with dog:
        assert done.wait(60)  # no step ever comes: it fires on its own
    assert exits_seen == [exits.HUNG] and hangs[0].step == 4 and hangs[0].idle_s > 0.2


def test_progress_keeps_the_watchdog_quiet_and_an_allowance_extends_a_phase():
    clock = Clock()
    dog, exits_seen, _, _ = watchdog(10, clock=clock)
    dog.expect("start-up", allowance_s=30)  # a measured start-up: 30 s
    assert not clock.looks(dog, 25)  # past the timeout, within the allowance
    for step in range(10):  # a step every 9 s: never idle for 10 s
        dog.expect(f"training step {step + 1}")
        assert not clock.looks(dog, 9)
        dog.progress(step + 1)
    assert not exits_seen
    assert not clock.looks(dog, 10)
    assert clock.looks(dog, 0.5) and exits_seen == [exits.HUNG]  # then silence: it fires


def test_time_the_process_lay_stopped_is_not_counted_as_idle():
    """Between two looks more time passed than the loop ever sleeps (SIGSTOP then SIGCONT):
    idle is counted again from the wake-up, so the rank gets its whole timeout once more."""
    clock = Clock()
    dog, exits_seen, hangs, _ = watchdog(10, clock=clock)
    dog.progress(3)
    assert not clock.looks(dog, 8)
    clock.advance(60)  # stopped for a minute: no look meanwhile
    assert not dog.check()
    assert not clock.looks(dog, 10)
    assert clock.looks(dog, 0.5) and hangs[0].idle_s == 10.5 and exits_seen == [exits.HUNG]


def test_a_hang_or_a_one_rank_oom_event_names_the_allocations_end():
    launch = {"event": "launch"}
    # srun reports the rank it killed (137) or the one that left (124, 76, 1): the event decides
    assert effective_exit(137, [launch, {"event": "hang", "rank": 1}], 75) == exits.HUNG
    assert effective_exit(1, [launch, {"event": "oom", "rank": 0}], 75) == exits.OUT_OF_MEMORY
    assert effective_exit(137, [launch, {"event": "signal"}, {"event": "preempted"},
                                {"event": "hang"}], 75) == 75  # saved first: a preemption
    requeue = decide([AllocationEnd(exits.HUNG, 20)], 0, 50, 3, 75)
    assert requeue.requeue and "hung (exit 124" in requeue.reason
    oom = decide([AllocationEnd(exits.OUT_OF_MEMORY, 20)], 0, 50, 3, 75)
    assert oom.requeue and "smaller micro-batch is carried" in oom.reason
    # A job that hangs at the same step again and again is a crash loop like any other.
    stuck = decide([AllocationEnd(exits.HUNG, 20)] * 4, 4, 50, 3, 75)
    assert not stuck.requeue and "crash loop" in stuck.reason


def test_a_carried_micro_batch_caps_the_plan_and_says_so():
    shape = ModelShape(2, 64, 172, 4, 2, 256, 64)
    free = plan(PlanRequest(2, shape, 16, (8, 4, 2, 1), 4))
    capped = plan(PlanRequest(2, shape, 16, (8, 4, 2, 1), 4, max_micro=2))
    assert (free.layout.micro_batch, free.layout.accum) == (8, 1)
    assert (capped.layout.micro_batch, capped.layout.accum) == (2, 4)
    assert capped.global_batch == 16
    assert any("ran out of memory and carried micro-batch 2" in n for n in capped.notes)
    assert plan(PlanRequest(2, shape, 16, (8, 4, 2, 1), 4, max_micro=8)).notes == ()


def test_the_hang_timeout_and_the_exit_codes_it_reserves_are_checked():
    with pytest.raises(ConfigError, match="train.hang_timeout_s=5.0 is invalid"):
        load_config(support.CONFIG, ["train.hang_timeout_s=5"])
    with pytest.raises(ConfigError, match="train.node_timeout_s=3.0 is invalid"):
        load_config(support.CONFIG, ["train.node_timeout_s=3"])
    for code in (exits.OUT_OF_MEMORY, exits.NODE_LOST, exits.HUNG):
        with pytest.raises(ConfigError, match="other than 76, 79 and 124"):
            load_config(support.CONFIG, [f"preemption.exit_code={code}"])


def test_a_fault_file_fires_once_on_the_named_rank_and_is_consumed(tmp_path):
    path = tmp_path / "faults"
    plans = [FaultPlan.from_mapping({"TELEPATHY_FAULT_FILE": str(path)}) for _ in range(2)]
    for p in plans:
        p.hit("step.oom", 5, 0)  # no file yet: nothing
    path.write_text("step.oom@*:1\n")
    plans[0].hit("step.oom", 6, 0)  # rank 0: not named
    assert path.exists()
    with pytest.raises(Exception, match="injected out-of-memory at step 7"):
        plans[1].hit("step.oom", 7, 1)
    assert not path.exists()  # consumed: no other rank, no later allocation fires it
    plans[1].hit("step.oom", 8, 1)
    path.write_text("step.start@*,sleep=0.01;step.oom@9:0\n")  # changed: read again
    before = os.stat(path).st_mtime_ns
    plans[0].hit("step.start", 9, 0)
    assert not path.exists() and before


def test_chaos_compares_bit_for_bit_and_allows_reduction_order_only_after_an_oom():
    ref = {s: {"loss": 1.0 + s, "micro_batch": 4} for s in range(1, 6)}
    same = {s: dict(r) for s, r in ref.items()}
    assert compare_losses(ref, same)["exact"]
    smaller = {**same, 5: {"loss": 6.0 * (1 + 1e-6), "micro_batch": 2}}
    out = compare_losses(ref, smaller)
    assert out["exact"] and (out["bit_exact_steps"], out["close_steps"]) == (4, 1)
    drifted = {**same, 4: {"loss": 5.0 * (1 + 1e-9), "micro_batch": 4}}
    assert compare_losses(ref, drifted)["differing_steps"] == [4]
    assert not compare_losses(ref, {s: r for s, r in same.items() if s != 3})["exact"]


def test_the_harness_gives_every_fault_room_and_restarts():
    cfg = load_config(support.CONFIG, harness_sets(["rank_kill"] * 30))
    assert cfg.train.steps >= 20 * 31 and cfg.preemption.max_restarts > 2 * 30
    assert cfg.train.hang_timeout_s == 45
    slow = load_config(support.CONFIG, harness_sets(["rank_kill"] * 29 + ["time_limit"]))
    assert slow.train.steps >= cfg.train.steps + 75 / 0.15  # steps go on until the signal
    # a fault after a node_fail waits out SLURM's retried kill; a last node_fail needs no room
    nodes = load_config(support.CONFIG, harness_sets(["node_fail"] + ["rank_kill"] * 29))
    assert nodes.train.steps >= cfg.train.steps + 90 / 0.15
    last = load_config(support.CONFIG, harness_sets(["rank_kill"] * 29 + ["node_fail"]))
    assert last.train.steps == cfg.train.steps


def test_out_of_memory_exits_are_not_a_crash_loop_they_shrink_the_plan():
    # Micro-batch 8 -> 4 -> 2 -> 1 carried across allocations, no checkpoint in between.
    history = [AllocationEnd(exits.OUT_OF_MEMORY, 0)] * 3
    assert decide(history, 3, 50, 3, 75).requeue



def test_start_up_is_allowed_twice_the_longest_earlier_one_and_never_less_than_the_floor():
    from telepathy.train.phases import STARTUP_FLOOR_S, Durations, startup_allowance_s

    assert startup_allowance_s(Durations()) == STARTUP_FLOOR_S == 120
    assert startup_allowance_s(Durations(startup_s=30)) == 120
    assert startup_allowance_s(Durations(startup_s=90)) == 180


class OneRankFake:
    """A fake of the process group of one rank (what measured_durations asks of it)."""

    is_main = True

    def broadcast_object(self, value):
        return value


def test_start_up_is_measured_to_an_allocations_first_training_line_not_an_evaluation(tmp_path):
    import json

    from telepathy.core.paths import RunPaths
    from telepathy.train.phases import measured_durations

    lines = {"events.jsonl": [{"event": "launch", "restart": 0, "time": 100.0},
                              {"event": "launch", "restart": 1, "time": 200.0}],
             # allocation 1 evaluated the step it resumed at (its evaluation a signal had
             # stopped) before its first step
             "metrics.jsonl": [{"step": 1, "loss": 2.0, "restart": 0, "time": 130.0},
                               {"step": 4, "eval_loss": 1.9, "restart": 1, "time": 205.0},
                               {"step": 5, "loss": 1.8, "restart": 1, "time": 260.0}]}
    for name, rows in lines.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert measured_durations(RunPaths.at(tmp_path), OneRankFake()).startup_s == 60.0


def test_a_node_whose_heartbeat_stops_is_lost_after_the_timeout_by_the_readers_clock(tmp_path):
    clock = Clock()
    n1 = NodeHeartbeat(tmp_path, "n1", ["n1", "n2", "n1"], "job-a", True, 30, rank=0, clock=clock)
    n2 = NodeHeartbeat(tmp_path, "n2", ["n1", "n2"], "job-a", True, 30, rank=1, clock=clock)
    assert n1.others == ["n2"] and n1.interval_s == 5 and interval_for(600) == 10
    # An earlier allocation's beat on the same host is no beat of this one.
    NodeHeartbeat(tmp_path, "n2", ["n1", "n2"], "job-old", True, 30).beat()
    assert n1.read("n2") is None and n1.check() is None
    for _ in range(10):  # both beat; the clock moves 10 s at a time, far past the timeout
        n2.beat()
        clock.advance(10)
        assert n1.check() is None
    clock.advance(30)  # n2 silent for exactly the timeout: not yet
    assert n1.check() is None
    clock.advance(0.5)
    lost = n1.check()
    assert (lost.host, lost.silent_s, lost.beats_seen, lost.rank) == ("n2", 30.5, 10, 0)
    fields = lost.fields()
    assert fields["lost_host"] == "n2" and fields["timeout_s"] == 30
    # A node never seen beating in this allocation is lost the same way, counted from the start.
    n3 = NodeHeartbeat(tmp_path, "n1", ["n1", "n3"], "job-a", False, 30, clock=clock)
    assert n3.check() is None
    clock.advance(31)
    assert n3.check().beats_seen == 0


def test_the_heartbeat_thread_beats_and_leaves_with_node_lost(tmp_path):
    exited, recorded = [], []
    alone = NodeHeartbeat(tmp_path, "n1", ["n1", "n2"], "job-a", True, 6, rank=3,
                          on_lost=recorded.append, step=lambda: 41, exit=exited.append)
    alone.interval_s = 0.05  # (the thread's pace; the timeout below is what is tested)
    alone.timeout_s = 0.3
    alone.start()
    alone._thread.join(10)
    assert exited == [exits.NODE_LOST]
    assert recorded[0].host == "n2" and recorded[0].step == 41 and recorded[0].silent_s > 0.3
    assert alone.read("n1") is not None and alone.count >= 2  # it beat meanwhile
