"""The relay's bookkeeping with a fake tracker (named as one): what each tracker is sent after a
crash, a purge or a failure. The real trackers, read back with their own readers:
tests/integration/test_track.py."""

import json

import pytest

from telepathy.config import config_from_dict
from telepathy.core.jsonl import read_jsonl
from telepathy.track import records, relay, sinks


class FakeTracker(sinks.Sink):
    """Records every call. `held`: the steps it already holds (what open() reads back)."""

    name = "mlflow"
    held = 0
    purge = False
    calls: list = []

    def open(self, ctx):
        if self.purge:
            self.purge_from = min(self.held, ctx.resume_step) + 1
            return self.purge_from - 1
        return self.held

    def step(self, step, scalars, notes):
        FakeTracker.calls.append(("step", step, scalars.get("train/loss")))

    def extra(self, step, scalars, notes):
        FakeTracker.calls.append(("extra", step, tuple(notes) or tuple(sorted(scalars))))

    def where(self):
        return "fake"


@pytest.fixture
def fake(monkeypatch):
    FakeTracker.calls = []
    FakeTracker.held = 0
    FakeTracker.purge = False
    monkeypatch.setitem(sinks.SINKS, "mlflow", FakeTracker)
    monkeypatch.setattr(relay, "SINKS", sinks.SINKS)
    return FakeTracker


def write(run_dir, name, rows):
    with open(run_dir / name, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def history(run_dir):
    """Allocation 0 trained 1-7 (checkpoint 5, then crashed); allocation 1 resumed from 5."""
    write(run_dir, "metrics.jsonl",
          [{"step": s, "loss": 10.0 + s, "restart": 0} for s in range(1, 8)] +
          [{"step": s, "loss": 20.0 + s, "restart": 1} for s in range(6, 9)])
    write(run_dir, "events.jsonl", [
        {"event": "start", "step": 0, "restart": 0, "time": 1},
        {"event": "checkpoint_saved", "step": 5, "restart": 0, "bytes": 10, "stall_s": 0.1,
         "seconds": 0.2, "time": 2},
        {"event": "hang", "step": 7, "restart": 0, "rank": 1, "idle_s": 30, "where": "step 8",
         "time": 3},
        {"event": "resume", "step": 5, "restart": 1, "checkpoint": "step_00000005", "time": 4}])


CFG = config_from_dict({"track": {"mlflow": {"enabled": True}}})


def test_a_tracker_that_holds_nothing_gets_final_values_then_the_live_steps(tmp_path, fake):
    history(tmp_path)
    r = relay.Relay(tmp_path, CFG, restart=1, resume_step=5)
    r.open()
    steps = [(s, loss) for kind, s, loss in fake.calls if kind == "step"]
    # steps 1-5 from allocation 0 (final), then allocation 1's 6-8: 6 and 7 once, its values
    assert steps == [(s, 10.0 + s) for s in range(1, 6)] + [(s, 20.0 + s) for s in (6, 7, 8)]
    notes = [c for c in fake.calls if c[0] == "extra"]
    assert ("extra", 5, ("checkpoint/bytes", "checkpoint/durable_s", "checkpoint/stall_s")) in notes
    assert any(str(n[2][0]).startswith("allocation 1: resume at step 5 (from step_00000005")
               for n in notes)


def test_steps_a_tracker_already_holds_are_not_sent_again(tmp_path, fake):
    history(tmp_path)
    fake.held = 7  # it got 1-7 from allocation 0 before the crash
    r = relay.Relay(tmp_path, CFG, restart=1, resume_step=5)
    r.open()
    assert [s for kind, s, _ in fake.calls if kind == "step"] == [8]
    tracking, = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "tracking"]
    assert (tracking["hwm"], tracking["skipped"]) == (7, 2)


def test_a_purging_tracker_gets_the_purged_steps_and_notes_again(tmp_path, fake):
    history(tmp_path)
    fake.held, fake.purge = 7, True  # TensorBoard: purged from step 6 on
    r = relay.Relay(tmp_path, CFG, restart=1, resume_step=5)
    r.state = {"mlflow": {"events": 4}}  # every event was given before
    r.open()
    assert [s for kind, s, _ in fake.calls if kind == "step"] == [6, 7, 8]
    # the purge removed the hang's note at step 7: given again; the others stay given
    assert [c[:2] for c in fake.calls if c[0] == "extra"] == [("extra", 7)]


def test_a_tracker_that_raises_is_dropped_once_with_an_event(tmp_path, fake, monkeypatch):
    history(tmp_path)
    monkeypatch.setenv(relay.FAULT_ENV, "mlflow")
    r = relay.Relay(tmp_path, CFG, restart=1, resume_step=5)
    r.open()
    r.pump()
    r.close()
    failed = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "tracker_failed"]
    assert [(e["tracker"], e["restart"]) for e in failed] == [("mlflow", 1)]
    assert r.sinks == {} and fake.calls == []


def test_notes_name_the_events_an_operator_looks_for():
    assert records.note({"event": "hang", "restart": 2, "step": 40, "rank": 1, "idle_s": 31,
                         "where": "training step 41"}) == \
        "allocation 2: hang at step 40 (rank 1 idle 31 s while training step 41)"
    assert records.note({"event": "checkpoint_started", "step": 3}) is None
    assert records.step_scalars({"loss": 1.5, "lr": 0.1, "restart": 2, "job_id": "7"}) == \
        {"train/loss": 1.5, "train/lr": 0.1, "run/restarts": 2.0}


def test_the_relays_events_leave_a_runs_state_as_it_was():
    from telepathy.watch.runview import summarize

    events = [{"event": "launch", "restart": 0, "time": 1, "job_id": "7"},
              {"event": "start", "step": 0, "restart": 0, "time": 2},
              {"event": "error", "restart": 0, "time": 3, "error": "X", "message": "m"},
              {"event": "requeue_refused", "restart": 0, "time": 4, "reason": "crash loop"}]
    relay_events = [{"event": "tracking", "restart": 1, "time": 50, "tracker": t, "where": t}
                    for t in ("tensorboard", "wandb", "mlflow")]
    metrics = [{"step": 1, "loss": 1.0, "restart": 0, "time": 2.5, "step_time_s": 0.1,
                "tokens_per_s": 1.0, "lr": 0.1}]
    before = summarize(None, metrics, events, [], now=60)
    after = summarize(None, metrics, events + relay_events, [], now=60)
    assert before.state == after.state == "stopped"
    assert after.last_update == before.last_update == 4
    assert after.trackers == {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


# -- evaluations: each once per tracker, whatever happened -------------------------------------------
EVAL_CFG = config_from_dict({"track": {"mlflow": {"enabled": True}},
                             "eval": {"path": "held-out.bin", "every_steps": 2}})


class FakeTrackerStore(sinks.Sink):
    """A fake tracker that keeps what its readers would show, across allocations: every
    (key, step, value) of train/loss and eval/loss it was sent. `purging`: TensorBoard's way
    (opening forgets every point from sinks.purge_step on; the relay sends them again); else
    MLflow's (it reads back the last step of train/loss and of eval/loss it holds)."""

    name = "mlflow"
    exact_steps = True
    purging = False
    shown: list = []

    def open(self, ctx):
        if not self.purging:
            return self._last("train/loss")
        self.purge_from = sinks.purge_step(ctx.state, ctx.resume_step)
        FakeTrackerStore.shown = [p for p in self.shown if p[1] < self.purge_from]
        return self.purge_from - 1

    def held_evals(self, ctx, hwm):
        return super().held_evals(ctx, hwm) if self.purging else self._last("eval/loss")

    def _last(self, key):
        return max([0, *(step for k, step, _ in self.shown if k == key)])

    def step(self, step, scalars, notes):
        FakeTrackerStore.shown += [(k, step, v) for k, v in scalars.items()
                                   if k in ("train/loss", "eval/loss")]

    def extra(self, step, scalars, notes):
        pass


@pytest.fixture(params=[False, True], ids=["read-back", "purging"])
def store(request, monkeypatch):
    FakeTrackerStore.shown = []
    FakeTrackerStore.purging = request.param
    monkeypatch.setitem(sinks.SINKS, "mlflow", FakeTrackerStore)
    monkeypatch.setattr(relay, "SINKS", sinks.SINKS)
    return FakeTrackerStore


def trained(step, restart):
    return {"step": step, "loss": 10.0 * (restart + 1) + step, "restart": restart}


def evaluated(step, restart):
    return {"step": step, "eval_loss": restart + step / 100, "eval_tokens": 64, "restart": restart}


def shown(store, key):
    """{step: [values]} of one key: more than one value is a step shown twice."""
    out: dict = {}
    for k, step, value in store.shown:
        if k == key:
            out.setdefault(step, []).append(value)
    return out


def test_each_evaluation_reaches_a_tracker_once_at_its_step_after_that_steps_line(tmp_path, fake):
    # Allocation 0 trained 1-7 and evaluated 2, 4, 6, then crashed; allocation 1 resumed from the
    # checkpoint of step 4: it trained 5-8 again and evaluated 6 again, and 8.
    write(tmp_path, "metrics.jsonl",
          [r for s in range(1, 8) for r in [trained(s, 0)] + ([evaluated(s, 0)] if s % 2 == 0 else [])]
          + [trained(5, 1), trained(6, 1), evaluated(6, 1), trained(7, 1), trained(8, 1),
             evaluated(8, 1)])
    r = relay.Relay(tmp_path, EVAL_CFG, restart=1, resume_step=4)
    r.open()
    write(tmp_path, "metrics.jsonl", [trained(9, 1), trained(10, 1), evaluated(10, 1)])
    r.pump()
    r.pump()
    sent = [(kind, s, loss) for kind, s, loss in fake.calls if kind == "step"]
    # the fake records train/loss: an evaluation's call carries none
    assert [s for _, s, loss in sent if loss is None] == [2, 4, 6, 8, 10]
    assert [s for _, s, _ in sent] == [1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 8, 8, 9, 10, 10]


def test_evaluations_of_earlier_allocations_and_live_ones_are_sent_with_their_values(tmp_path,
                                                                                     store):
    write(tmp_path, "metrics.jsonl", [trained(1, 0), trained(2, 0), evaluated(2, 0)])
    r = relay.Relay(tmp_path, EVAL_CFG, restart=1, resume_step=2)
    r.open()
    write(tmp_path, "metrics.jsonl", [trained(3, 1), trained(4, 1), evaluated(4, 1)])
    r.pump()
    r.close()
    assert shown(store, "eval/loss") == {2: [0.02], 4: [1.04]}
    assert shown(store, "train/loss") == {1: [11.0], 2: [12.0], 3: [23.0], 4: [24.0]}


def test_an_evaluation_done_again_after_a_crash_is_not_sent_twice(tmp_path, store):
    # Allocation 0 trained 1-7, evaluated 2, 4, 6; its relay flushed, then both were killed.
    write(tmp_path, "metrics.jsonl",
          [r for s in range(1, 8) for r in [trained(s, 0)] + ([evaluated(s, 0)] if s % 2 == 0 else [])])
    first = relay.Relay(tmp_path, EVAL_CFG, restart=0, resume_step=0)
    first.open()
    # Allocation 1 resumed from the checkpoint of step 4: 5-8 trained again, 6 evaluated again.
    write(tmp_path, "metrics.jsonl", [trained(5, 1), trained(6, 1), evaluated(6, 1),
                                      trained(7, 1), trained(8, 1), evaluated(8, 1)])
    second = relay.Relay(tmp_path, EVAL_CFG, restart=1, resume_step=4)
    second.open()
    second.close()
    evals, steps = shown(store, "eval/loss"), shown(store, "train/loss")
    assert sorted(evals) == [2, 4, 6, 8] and all(len(v) == 1 for v in evals.values()), evals
    assert sorted(steps) == list(range(1, 9)) and all(len(v) == 1 for v in steps.values()), steps
    # TensorBoard's purge from step 5 shows the run that went on; MLflow keeps what it holds
    assert evals[6] == ([1.06] if store.purging else [0.06])


@pytest.mark.parametrize("sent_before_the_kill", [True, False])
def test_an_evaluation_unsettled_at_the_last_flush_is_shown_once(tmp_path, store,
                                                                 sent_before_the_kill):
    # The relay flushed after step 4's line, before its evaluation's; the evaluation reached the
    # tracker (or not) and the relay was killed before its next flush. Allocation 1 resumed
    # from the checkpoint of step 4.
    write(tmp_path, "metrics.jsonl", [trained(1, 0), trained(2, 0), evaluated(2, 0),
                                      trained(3, 0), trained(4, 0)])
    first = relay.Relay(tmp_path, EVAL_CFG, restart=0, resume_step=0)
    first.open()
    write(tmp_path, "metrics.jsonl", [evaluated(4, 0)])
    if sent_before_the_kill:
        first.pump()
    write(tmp_path, "metrics.jsonl", [trained(5, 1), trained(6, 1), evaluated(6, 1)])
    second = relay.Relay(tmp_path, EVAL_CFG, restart=1, resume_step=4)
    second.open()
    assert shown(store, "eval/loss") == {2: [0.02], 4: [0.04], 6: [1.06]}
    assert sorted(shown(store, "train/loss")) == list(range(1, 7))
    assert all(len(v) == 1 for v in shown(store, "train/loss").values())


def test_the_evaluation_a_preemption_stopped_is_sent_when_the_resumed_run_does_it(tmp_path,
                                                                                 store):
    # Allocation 0 trained 1-4; a signal stopped the evaluation of step 4, the checkpoint of 4
    # was saved, and the relay closed. Allocation 1 evaluates step 4 first, then trains on.
    write(tmp_path, "metrics.jsonl", [trained(1, 0), trained(2, 0), evaluated(2, 0),
                                      trained(3, 0), trained(4, 0)])
    first = relay.Relay(tmp_path, EVAL_CFG, restart=0, resume_step=0)
    first.open()
    first.close()
    write(tmp_path, "metrics.jsonl", [evaluated(4, 1), trained(5, 1), trained(6, 1),
                                      evaluated(6, 1)])
    second = relay.Relay(tmp_path, EVAL_CFG, restart=1, resume_step=4)
    second.open()
    second.close()
    assert shown(store, "eval/loss") == {2: [0.02], 4: [1.04], 6: [1.06]}
    assert all(len(v) == 1 for v in shown(store, "train/loss").values())


class FakeWandbRun:
    """What the W&B sink calls on a run, recorded: a resumed online run that holds steps 1-4
    and the evaluation of step 2."""

    id, url, starting_step, summary = "fake", "http://fake", 5, {"eval/step": 2}

    def __init__(self):
        self.rows: list = []
        self.metrics: list = []

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, data, step):
        self.rows.append((step, dict(data)))

    def finish(self, exit_code):
        pass


def test_wandb_draws_an_evaluation_of_a_step_it_held_at_that_step_from_its_next_row(
        tmp_path, monkeypatch):
    import types

    run = FakeWandbRun()
    fake_wandb = types.SimpleNamespace(init=lambda **kw: run, Settings=lambda **kw: None)
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake_wandb)
    cfg = config_from_dict({"track": {"wandb": {"mode": "online", "project": "p"}}})
    ctx = sinks.Context(tmp_path, cfg.to_dict(), cfg.track, 4, {})
    sink = sinks.Wandb()
    assert (sink.open(ctx), sink.held_evals(ctx, 4)) == (4, 2)
    sink.evaluation(4, {"eval/loss": 1.5})  # W&B holds step 4's row: it cannot be logged at 4
    sink.step(5, {"train/loss": 3.0}, [])
    sink.step(6, {"train/loss": 2.9}, [])
    sink.evaluation(6, {"eval/loss": 1.4})  # its own step's row
    assert run.rows == [(5, {"eval/loss": 1.5, "eval/step": 4, "train/loss": 3.0}),
                        (6, {"train/loss": 2.9}), (6, {"eval/loss": 1.4, "eval/step": 6})]
    assert ("eval/*", "eval/step") in run.metrics


def test_wandbs_history_rows_carry_the_step_they_evaluated():
    printed = ('# record 7: history\nnum: 7\nhistory: {\n  item: {\n    nested_key: "train/loss"\n'
               '    value_json: "0.9"\n  }\n  step: {\n    num: 4\n  }\n}\n\n'
               '# record 8: history\nnum: 8\nhistory: {\n  item: {\n    nested_key: "eval/loss"\n'
               '    value_json: "1.5"\n  }\n  item: {\n    nested_key: "eval/step"\n'
               '    value_json: "4"\n  }\n  step: {\n    num: 5\n  }\n}\n')
    assert sinks.history_rows(printed) == [(4, None), (5, 4)]
