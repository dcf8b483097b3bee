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
