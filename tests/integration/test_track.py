"""Trackers on real runs, read back with each tool's own reader: TensorBoard's EventAccumulator,
W&B's offline run files through `wandb leet inspect`, MLflow's client. One tracker run per run
directory across a SIGTERM, a rank SIGKILLed (steps trained again) and a tracker that raises on
every call; the losses bit for bit those of the uninterrupted run."""

import collections
import json
import subprocess
import sys

import numpy as np
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from telepathy.core.jsonl import last_per_step
from telepathy.track.sinks import wandb_offline_steps
from tests import support
from tests.support import RNG, ROOT, assert_same_losses

# flush_s: a loaded 2-core machine must not cut the last allocation's relay short (what these
# tests read back is what the allocations sent; no later one would fill a gap in).
TRACK = ["track.tensorboard=true", "track.wandb.mode=offline", "track.mlflow.enabled=true",
         "track.flush_s=120"]


def repeated(steps):
    return sorted(s for s, n in collections.Counter(steps).items() if n > 1)


def test_one_tracker_run_per_run_directory_across_requeues_crashes_and_a_failing_tracker(
        tmp_path, reference):
    run_dir = tmp_path / "run"
    # 1. SIGTERM at a random step: saved, exit for requeue.
    rc, seen = support.interrupt(run_dir, RNG.randint(5, 25), world=2, sets=TRACK)
    stopped = support.events(run_dir, "preempted")[0]["step"]
    # 2. Resumed; rank 1 SIGKILLs itself some steps past the next checkpoint, so that those steps
    # are trained again; MLflow raises on every call in this allocation.
    checkpoint = min((stopped // 20 + 1) * 20, 40)  # (a SIGTERM seen late: at most step 40)
    kill_at = RNG.randint(max(checkpoint, stopped) + 3, 58)
    rc = support.run(run_dir, 2, TRACK, env={"TELEPATHY_FAULT": f"step.start@{kill_at}:1",
                                             "TELEPATHY_TRACK_FAULT": "mlflow"})
    assert rc != 0, support.log_text(run_dir)
    rows = support.metrics(run_dir)
    crashed = max(r["step"] for r in rows if r["restart"] == 1)
    assert crashed > checkpoint, support.log_text(run_dir)
    # 3. Resumed to the end.
    assert support.run(run_dir, 2, TRACK) == 0, support.log_text(run_dir)
    assert_same_losses(run_dir, reference(2))

    final = last_per_step(support.metrics(run_dir))
    resumed = [e["step"] for e in support.events(run_dir, "resume")]
    assert resumed[0] == stopped and checkpoint <= resumed[1] < crashed, (resumed, crashed)
    every_step = list(range(1, 61))
    relay_log = (run_dir / "track" / "relay.log").read_text()
    state = json.loads((run_dir / "track" / "state.json").read_text())

    # The failing tracker was dropped with one warning and an event; training went on.
    failed = support.events(run_dir, "tracker_failed")
    assert [(e["tracker"], e["restart"]) for e in failed] == [("mlflow", 1)], failed
    assert relay_log.count("tracker mlflow failed") == 1

    # TensorBoard: train/loss once per step, the run's final values (float32, as it stores them).
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == every_step, repeated([e.step for e in loss])
    assert [e.value for e in loss] == [np.float32(final[s]["loss"]) for s in every_step]
    assert [e.value for e in acc.Scalars("run/restarts")] == \
        [final[s]["restart"] for s in every_step]
    assert {e.step for e in acc.Scalars("checkpoint/bytes")} >= {20, 40, 60}
    assert "events/text_summary" in acc.Tags()["tensors"]

    # W&B: one run id across the three allocations, each step once over its offline files.
    run_id = state["wandb"]["run_id"]
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 3 and all(p.name.endswith(f"-{run_id}") for p in offline), offline
    steps = wandb_offline_steps(run_dir / "wandb", run_id)
    assert sorted(steps) == every_step, repeated(steps)
    # wandb-core's reader run directly reads what `wandb leet inspect` itself prints
    assert wandb_offline_steps(run_dir / "wandb", run_id, direct=False) == steps

    # MLflow: one run in the experiment, train/loss once per step (the allocation where it
    # failed was filled in by the next one).
    client = MlflowClient(state["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name("telepathy")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow"]["run_id"]]
    history = client.get_metric_history(state["mlflow"]["run_id"], "train/loss")
    assert sorted(m.step for m in history) == every_step, repeated([m.step for m in history])
    assert {m.step: m.value for m in history} == {s: final[s]["loss"] for s in every_step}
    assert runs[0].data.params["train.steps"] == "60" and runs[0].info.status == "FINISHED"

    # `telepathy track sync` afterwards finds nothing to send: still each step once.
    sync = subprocess.run([sys.executable, "-m", "telepathy", "track", "sync", str(run_dir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert sync.returncode == 0, sync.stderr
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == every_step
    assert sorted(wandb_offline_steps(run_dir / "wandb", run_id)) == every_step
    assert sorted(m.step for m in client.get_metric_history(state["mlflow"]["run_id"],
                                                            "train/loss")) == every_step

    # tail and report name the tracker runs.
    tail = subprocess.run([sys.executable, "-m", "telepathy", "tail", str(run_dir), "--once",
                           "--no-slurm"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert tail.returncode == 0, tail.stderr
    assert run_id in tail.stdout and state["mlflow"]["run_id"] in tail.stdout
    assert str(run_dir / "tensorboard") in tail.stdout
    report = subprocess.run([sys.executable, "-m", "telepathy", "report", str(run_dir)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert report.returncode == 0, report.stderr
    for name, where in (("tensorboard", str(run_dir / "tensorboard")), ("wandb", run_id),
                        ("mlflow", state["mlflow"]["run_id"])):
        assert any(line.startswith(name) and where in line
                   for line in report.stdout.splitlines()), report.stdout


def test_an_enabled_tracker_without_its_package_is_refused_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    code = ("import sys; sys.modules['wandb'] = None; from telepathy.train.resume import main; "
            f"sys.exit(main(['--config', {support.CONFIG!r}, '--run-dir', {str(run_dir)!r}, "
            "'--set', 'track.wandb.mode=offline']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert "track.wandb.mode=offline needs the Python package(s) wandb" in out.stderr
    assert "pip install 'telepathy[wandb]'" in out.stderr
    assert not (run_dir / "events.jsonl").exists()  # nothing started


def test_a_tracker_without_its_network_blocks_no_other_tracker_and_no_step(tmp_path, reference):
    """W&B online with its server unreachable (a closed port on this machine): its init waits,
    then fails; TensorBoard, in its own thread of the relay, gets every step meanwhile; the
    run's losses are the uninterrupted run's, bit for bit."""
    run_dir = tmp_path / "run"
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "5",
           "WANDB_API_KEY": "0" * 40}
    assert support.run(run_dir, 1, ["track.tensorboard=true", "track.wandb.mode=online"],
                       env=env) == 0, support.log_text(run_dir)
    assert_same_losses(run_dir, reference(1))
    failed, = support.events(run_dir, "tracker_failed")
    assert failed["tracker"] == "wandb" and "127.0.0.1:9" in failed["error"], failed
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 61))
