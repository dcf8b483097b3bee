"""The trainer's save, preemption and out-of-memory logic on fakes of its collaborators.

Fakes (named so) of the process group, the checkpoint manager, the engine's steps and the
preemption flag: milliseconds per test. The same logic runs against real DeepSpeed processes,
real signals and real files in tests/integration and tests/slurm.
"""

import socket
from dataclasses import dataclass, field

import pytest
import torch

from telepathy.config import config_from_dict
from telepathy.core import exits
from telepathy.core.eventlog import EventLog
from telepathy.core.events import SaveResult, Stamp
from telepathy.data.stream import DataPosition
from telepathy.plan.placement import Layout
from telepathy.train.evaluate import EvalResult
from telepathy.train.trainer import RankOutOfMemory, RunInfo, Trainer


class FakeDist:
    rank, world_size, is_main = 0, 1, True

    def any(self, flags):
        return [bool(f) for f in flags]

    def barrier(self):
        pass

    def all_gather_object(self, obj):
        return [obj]


@dataclass
class FakeFlag:
    """A preemption flag that a test sets before a chosen step."""

    at_step: int | None = None
    steps: "FakeSteps | None" = None
    received_at: float | None = None
    name: str | None = "SIGTERM"

    @property
    def is_set(self):
        return self.at_step is not None and self.steps.done >= self.at_step


@dataclass
class FakeCheckpoints:
    """Records saves; a save completes at once unless a test makes it fail in the background."""

    fits: bool = True
    fail_steps: tuple = ()
    in_flight: bool = False
    """Results come only from wait(): a save still being written when the run leaves."""
    expected_seconds: float | None = None
    saves: list = field(default_factory=list)
    recorded_best: list = field(default_factory=list)
    complete: list = field(default_factory=list)
    pending: list = field(default_factory=list)

    def space(self):
        return self.fits, 10**9 if self.fits else 10, 10**6

    def save(self, engine, step, state, reason="", wait=False):
        self.saves.append((step, reason, wait, state["samples_seen"]))
        failed = step in self.fail_steps
        if not failed:
            self.complete.append(step)
        self.pending.append(SaveResult(step, reason, f"step_{step:08d}", 0.01, 0.1,
                                       error="rank 0: OSError: No space left" if failed else None))
        return 0.01

    def completed(self):
        if self.in_flight:
            return []
        out, self.pending = self.pending, []
        return out

    def wait(self):
        self.in_flight = False
        return self.pending[-1] if self.pending else None

    def newest_complete_step(self):
        return max(self.complete, default=0)

    def record_best(self, best):
        self.recorded_best.append(best["step"])


@dataclass
class FakeSteps:
    """Optimizer steps whose loss is a function of the step; out-of-memory on request."""

    oom_at: dict = field(default_factory=dict)
    """step (1-based) -> how many times it runs out of memory."""
    engine: object = None
    last_tokens: object = None
    done: int = 0
    asked: int = 0
    layouts: list = field(default_factory=list)
    dropped: list = field(default_factory=list)

    def run(self, step, samples_seen, layout):
        if self.oom_at.get(step + 1, 0) > 0:
            self.oom_at[step + 1] -= 1
            raise torch.OutOfMemoryError("fake: CUDA out of memory")
        self.layouts.append(layout)
        self.done = step + 1
        return 1.0 / (step + 1), 1e-3

    def counters(self):
        self.asked += 1  # a second look would differ: the rewind point is taken once per step
        return ("counters before step", self.done + 1, self.asked)

    def drop_partial_step(self, counters, layout):
        self.dropped.append((counters, layout))

    def grad_norm(self):
        return None

    def memory_peak_gb(self):
        return None


class FakeData:
    def position(self, sample_index):
        return DataPosition(*divmod(sample_index, 1000))


class ListWriter:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)

    def close(self):
        pass


def make(steps=60, every_steps=20, micro_sizes=(8, 4, 2, 1), layout=Layout(1, 8, 1), **fakes):
    cfg = config_from_dict({"train": {"steps": steps, "global_batch": 8, "warmup_steps": 0},
                            "checkpoint": {"every_steps": every_steps},
                            "placement": {"micro_batch_sizes": list(micro_sizes)}})
    steps_ = fakes.pop("steps_", FakeSteps())
    flag = fakes.pop("flag", FakeFlag())
    flag.steps = steps_
    checkpoints = fakes.pop("checkpoints", FakeCheckpoints())
    dist = fakes.pop("dist", FakeDist())
    events, metrics = ListWriter(), ListWriter()
    trainer = Trainer(cfg, dist, steps_, FakeData(), layout, checkpoints, flag, metrics,
                      EventLog(events, Stamp(0, "42", 1)), RunInfo(0, "42"), **fakes)
    return trainer, checkpoints, steps_, events


def kinds(events):
    return [r["event"] for r in events.records]


def test_a_run_saves_every_n_steps_and_at_the_end():
    trainer, ckpts, steps, events = make(steps=50, every_steps=20)
    assert trainer.run(0) == exits.FINISHED
    assert [(s, r, w) for s, r, w, _ in ckpts.saves] == [
        (20, "interval_steps", False), (40, "interval_steps", False), (50, "final", True)]
    assert steps.done == 50 and kinds(events)[-1] == "finished"
    assert [s for _, _, _, s in ckpts.saves] == [160, 320, 400]  # samples seen: step x 8


def test_a_signal_saves_the_current_step_synchronously_and_exits_for_requeue():
    trainer, ckpts, steps, events = make(flag=FakeFlag(at_step=27))
    assert trainer.run(0) == exits.PREEMPTED
    assert steps.done == 27 and ckpts.saves[-1][:3] == (27, "preemption", True)
    assert kinds(events)[-2:] == ["checkpoint_saved", "preempted"]
    assert "signal" in kinds(events)
    assert events.records[-1]["heard"] == [{"rank": 0, "host": socket.gethostname(),
                                            "signal": "SIGTERM"}]


def test_the_preempted_event_says_which_rank_heard_no_signal_itself():
    """The ranks agreed because another one heard it: this one says null (after a short wait
    for a signal still on its way)."""
    class Gather(FakeDist):
        def all_gather_object(self, obj):
            return [("n1", "SIGTERM"), obj]

    trainer, _, _, events = make(flag=FakeFlag(at_step=5, name=None), dist=Gather())
    assert trainer.run(0) == exits.PREEMPTED
    assert [(h["rank"], h["host"], h["signal"]) for h in events.records[-1]["heard"]][0] == \
        (0, "n1", "SIGTERM")
    assert events.records[-1]["heard"][1]["signal"] is None


def test_a_signal_during_an_interval_save_exits_at_that_step_without_a_second_save():
    """Step 20's save starts right after the step, before the ranks agree on the signal."""
    trainer, ckpts, steps, _ = make(flag=FakeFlag(at_step=20))
    assert trainer.run(0) == exits.PREEMPTED
    assert [(s, r, w) for s, r, w, _ in ckpts.saves] == [(20, "interval_steps", False)]
    assert steps.done == 20


def test_a_signal_while_the_interval_save_of_that_step_fails_saves_it_again():
    """The background save of step 20 fails: the preemption must not trust it."""
    trainer, ckpts, _, events = make(flag=FakeFlag(at_step=20),
                                     checkpoints=FakeCheckpoints(fail_steps=(20,)))
    assert trainer.run(0) == exits.PREEMPTED
    assert [(s, r, w) for s, r, w, _ in ckpts.saves] == [(20, "interval_steps", False),
                                                         (20, "preemption", True)]
    assert "checkpoint_failed" in kinds(events)


def test_a_save_that_fails_while_the_run_leaves_is_made_again_synchronously():
    """Step 20's background save is still being written at the signal; waiting for it shows
    that it failed, so the preemption saves step 20 itself."""
    checkpoints = FakeCheckpoints(fail_steps=(20,), in_flight=True)
    trainer, ckpts, _, events = make(flag=FakeFlag(at_step=20), checkpoints=checkpoints)
    assert trainer.run(0) == exits.PREEMPTED
    assert [(s, r, w) for s, r, w, _ in ckpts.saves] == [(20, "interval_steps", False),
                                                         (20, "preemption", True)]
    assert kinds(events).count("checkpoint_failed") == 2  # the fake fails both


def test_a_signal_right_after_a_resume_exits_without_saving_again():
    trainer, ckpts, steps, events = make(flag=FakeFlag(at_step=40))
    steps.done = 40
    assert trainer.run(40, samples_seen=320) == exits.PREEMPTED
    assert ckpts.saves == [] and kinds(events) == ["signal", "preempted"]


def test_a_failed_background_save_is_reported_and_training_goes_on():
    trainer, ckpts, steps, events = make(steps=50, checkpoints=FakeCheckpoints(fail_steps=(20,)))
    assert trainer.run(0) == exits.FINISHED
    failed = [r for r in events.records if r["event"] == "checkpoint_failed"]
    assert [(r["step"], r["error"]) for r in failed] == [(20, "rank 0: OSError: No space left")]
    assert ckpts.complete == [40, 50] and steps.done == 50


def test_a_resumed_run_does_not_save_its_start_step_again():
    trainer, ckpts, _, _ = make(steps=60, every_steps=20)
    assert trainer.run(40, samples_seen=320) == exits.FINISHED
    assert [(s, r) for s, r, _, _ in ckpts.saves] == [(60, "final")]


def test_no_space_skips_the_save_and_training_goes_on():
    trainer, ckpts, steps, events = make(checkpoints=FakeCheckpoints(fits=False), steps=30)
    assert trainer.run(0) == exits.FINISHED
    assert ckpts.saves == [] and steps.done == 30
    skipped = [r for r in events.records if r["event"] == "checkpoint_skipped"]
    assert [r["step"] for r in skipped] == [20, 30]
    assert skipped[0]["free_bytes"] == 10 and skipped[0]["needed_bytes"] == 10**6


def test_out_of_memory_halves_the_micro_batch_and_retries_the_same_step():
    steps_ = FakeSteps(oom_at={5: 1})
    trainer, _, _, events = make(steps=10, every_steps=0, steps_=steps_)
    assert trainer.run(0) == exits.FINISHED
    assert steps_.done == 10 and len(steps_.layouts) == 10  # step 5 ran once, after the retry
    assert steps_.dropped == [(("counters before step", 5, 5), Layout(1, 4, 2))]
    assert steps_.layouts[3] == Layout(1, 8, 1) and set(steps_.layouts[4:]) == {Layout(1, 4, 2)}
    oom = [r for r in events.records if r["event"] == "oom_recovered"]
    assert oom == [{**oom[0], "step": 5, "micro_batch": 4, "accum": 2,
                    "previous_micro_batch": 8, "previous_accum": 1}]


def test_out_of_memory_retries_are_bounded_by_the_config():
    steps_ = FakeSteps(oom_at={3: 10})
    trainer, _, _, _ = make(steps=10, every_steps=0, steps_=steps_)  # max_oom_retries: 3
    with pytest.raises(torch.OutOfMemoryError):
        trainer.run(0)
    assert [layout.micro_batch for _, layout in steps_.dropped] == [4, 2, 1]
    assert {counters for counters, _ in steps_.dropped} == {("counters before step", 3, 3)}


def test_out_of_memory_at_the_smallest_micro_batch_is_raised():
    steps_ = FakeSteps(oom_at={2: 1})
    trainer, _, _, _ = make(steps=4, every_steps=0, micro_sizes=(8,), steps_=steps_)
    with pytest.raises(torch.OutOfMemoryError):
        trainer.run(0)
    assert steps_.dropped == []


def test_a_save_that_may_not_fit_the_time_left_is_announced():
    trainer, _, _, events = make(flag=FakeFlag(at_step=3),
                                 checkpoints=FakeCheckpoints(expected_seconds=90.0),
                                 time_left=lambda: 60.0)
    assert trainer.run(0) == exits.PREEMPTED
    risk = [r for r in events.records if r["event"] == "save_deadline_risk"]
    assert len(risk) == 1 and risk[0]["expected_save_s"] == 90.0 and risk[0]["time_left_s"] == 60.0


def test_every_event_is_stamped_with_restart_job_and_world_size():
    trainer, _, _, events = make(steps=25, flag=FakeFlag(at_step=21))
    trainer.run(0)
    assert events.records and all(
        (r["restart"], r["job_id"], r["world_size"]) == (0, "42", 1) and r["time"] > 0
        for r in events.records)


def test_a_non_finite_loss_stops_the_run():
    class NanSteps(FakeSteps):
        def run(self, step, samples_seen, layout):
            super().run(step, samples_seen, layout)
            return float("nan") if step == 2 else 1.0, 1e-3

    trainer, _, _, _ = make(steps=10, steps_=NanSteps())
    with pytest.raises(FloatingPointError, match="loss is nan at step 3"):
        trainer.run(0)


def test_out_of_memory_beside_other_ranks_carries_the_smaller_layout_and_leaves():
    """World 2: the other rank may be inside the step's collectives, so no retry here."""
    class TwoRanks(FakeDist):
        rank, world_size = 1, 2

    steps_ = FakeSteps(oom_at={5: 1})
    trainer, _, _, _ = make(steps=10, every_steps=0, steps_=steps_, layout=Layout(2, 4, 1))
    trainer.dist = TwoRanks()
    carried = []
    trainer.carry = lambda new, step, exc: carried.append((new, step, type(exc).__name__))
    with pytest.raises(RankOutOfMemory) as left:
        trainer.run(0)
    assert left.value.code == exits.OUT_OF_MEMORY
    assert carried == [(Layout(2, 2, 2), 5, "OutOfMemoryError")]
    assert steps_.dropped == []  # the partial step is not retried


def test_the_watchdog_hears_of_every_step_and_every_save():
    class Dog:
        def __init__(self):
            self.calls = []

        def expect(self, where, allowance_s=None):
            self.calls.append(("expect", where, allowance_s))

        def progress(self, step=None):
            self.calls.append(("progress", step))

    dog = Dog()
    trainer, _, _, _ = make(steps=4, every_steps=2, watchdog=dog)
    assert trainer.run(0) == exits.FINISHED
    assert [c[1] for c in dog.calls if c[0] == "progress"] == [1, 2, 3, 4]
    wheres = [c[1] for c in dog.calls if c[0] == "expect"]
    assert wheres[0] == "the first step (1) after start-up"
    assert "saving checkpoint step 2" in wheres and "saving checkpoint step 4" in wheres


def test_start_up_runs_without_the_cyclic_collector_and_training_with_it():
    import gc
    import weakref

    from telepathy.train.resume import freeze_imports, settle_gc

    class Node:
        pass

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    freeze_imports()
    settle_gc()  # the collector was on (an in-process caller): nothing changes
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    gc.disable()  # as `telepathy resume` starts
    try:
        freeze_imports()  # once the engine's libraries are imported
        assert gc.get_freeze_count() > frozen, "the collections of start-up would rescan them"
        frozen = gc.get_freeze_count()
        a, b = Node(), Node()  # made after that freeze, as the model and the engine are
        a.other, b.other = b, a  # a reference cycle made during start-up
        gone = weakref.ref(a)
        del a, b
        settle_gc()
        assert gc.isenabled(), "training would run without the cyclic collector"
        assert gone() is None, "start-up's garbage cycles were frozen, never to be freed"
        assert gc.get_freeze_count() > frozen, "start-up's objects would be rescanned by every collection"
    finally:
        gc.enable()


def test_resume_main_in_this_process_leaves_the_collector_as_it_found_it(tmp_path):
    import gc

    from telepathy.train.resume import main

    assert main(["--config", str(tmp_path / "missing.yaml"), "--run-dir", str(tmp_path)]) == 2
    assert gc.isenabled()


# -- validation and the best checkpoint (checkpoint.keep_best) ---------------------------------
@dataclass
class FakeEvaluator:
    """Evaluation losses from a table by step; a preemption signal stops it as the real one's
    agreement before each forward does."""

    losses: dict
    runs: list = field(default_factory=list)

    def run(self, model, step, flag, progress=lambda: None):
        self.runs.append(step)
        if flag.is_set:
            return None
        return EvalResult(step, self.losses[step], 100, 4, 0.01)


def make_eval(losses, steps=12, keep_best=True, **fakes):
    trainer, ckpts, steps_, events = make(steps=steps, every_steps=5,
                                          evaluator=FakeEvaluator(losses), **fakes)
    trainer.cfg = config_from_dict({
        **trainer.cfg.to_dict(), "eval": {"path": "val.ex", "every_steps": 3},
        "checkpoint": {"every_steps": 5, "keep_best": keep_best}})
    return trainer, ckpts, steps_, events


def test_an_evaluation_that_improves_saves_its_step_and_a_worse_one_does_not():
    losses = {3: 2.0, 6: 1.5, 9: 1.7, 12: 1.2}
    trainer, ckpts, _, events = make_eval(losses)
    assert trainer.run(0) == exits.FINISHED
    assert trainer.evaluator.runs == [3, 6, 9, 12]
    assert [(s, r) for s, r, _, _ in ckpts.saves] == [
        (3, "best"), (5, "interval_steps"), (6, "best"), (10, "interval_steps"), (12, "final")]
    rows = [r for r in trainer.metrics.records if "eval_loss" in r]
    assert [(r["step"], r["eval_loss"]) for r in rows] == sorted(losses.items())
    assert all("loss" not in r for r in rows)
    assert [e["step"] for e in events.records if e["event"] == "best_checkpoint"] == [3, 6, 12]
    assert trainer.state(12)["best"] == {"step": 12, "eval_loss": 1.2}
    assert trainer.state(12)["eval"] == {"last_step": 12}


def test_without_keep_best_evaluations_save_nothing():
    trainer, ckpts, _, events = make_eval({3: 2.0, 6: 1.5, 9: 1.7, 12: 1.2}, keep_best=False)
    assert trainer.run(0) == exits.FINISHED
    assert [r for _, r, _, _ in ckpts.saves] == ["interval_steps", "interval_steps", "final"]
    assert "best_checkpoint" not in kinds(events)
    assert trainer.state(12)["best"] is None  # nothing to keep, nothing kept


def test_a_signal_during_an_evaluation_saves_that_step_and_the_resume_evaluates_it_again():
    losses = {3: 2.0, 6: 1.5, 9: 1.7, 12: 1.2}
    trainer, ckpts, _, events = make_eval(losses, flag=FakeFlag(at_step=6))
    assert trainer.run(0) == exits.PREEMPTED
    assert ckpts.saves[-1][:3] == (6, "preemption", True)
    assert [r["step"] for r in trainer.metrics.records if "eval_loss" in r] == [3]
    assert "eval_stopped" in kinds(events)
    saved = trainer.state(6)
    assert saved["eval"] == {"last_step": 3} and saved["best"]["step"] == 3

    again, ckpts2, _, _ = make_eval(losses)
    assert again.run(6, evaluated={"eval": saved["eval"], "best": saved["best"]}) == exits.FINISHED
    assert again.evaluator.runs == [6, 9, 12]  # step 6 first, once
    assert [s for s, _, _, _ in ckpts2.saves] == [10, 12]  # step 6 is on disk already
    assert ckpts2.recorded_best == [6]  # the final save records 12 itself
    assert again.state(12)["best"] == {"step": 12, "eval_loss": 1.2}
