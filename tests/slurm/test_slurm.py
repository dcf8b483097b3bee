"""Acceptance against the real local SLURM cluster: sbatch, scancel, --signal, preemption, requeue."""

import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from telepathy.slurm import scontrol
from tests import support
from tests.support import ENDED, RNG, Job

pytestmark = pytest.mark.slurm
def assert_exact(job, reference):
    got = support.losses(job.run_dir)
    assert sorted(got) == sorted(reference), job.logs()[-3000:]
    assert [s for s in reference if got[s] != reference[s]] == [], "losses differ after the resume"


def assert_requeue_trail(job, causes):
    """events.jsonl records each signal, save, requeue and resume with the job id and restart."""
    events = support.events(job.run_dir)
    assert {e.get("job_id") for e in events} == {job.id}
    requeues = [e for e in events if e["event"] == "requeue"]
    assert [e["cause"] for e in requeues] == causes
    assert [e["slurm_restart_count"] for e in requeues] == list(range(len(causes)))
    assert [e["restart"] for e in events if e["event"] == "resume"] == list(range(1, len(causes) + 1))
    launches = [e for e in events if e["event"] == "launch"]
    assert [e["slurm_restart_count"] for e in launches] == list(range(len(causes) + 1))
    for kind in ("signal", "preempted"):
        assert len([e for e in events if e["event"] == kind]) == len(causes)
    # Each preemption left a checkpoint of its step: its own save, or an interval save of that
    # very step (then in flight when the signal came, and waited for).
    saved = {(e["restart"], e["step"]) for e in events if e["event"] == "checkpoint_saved"}
    preempted = [(e["restart"], e["step"]) for e in events if e["event"] == "preempted"]
    assert len(preempted) == len(causes) and set(preempted) <= saved
    out = job.out.read_text()
    for restart in range(len(causes) + 1):  # every allocation appended to the same file
        assert f"telepathy: job {job.id} restart {restart} on" in out


def test_an_sft_lora_job_scancel_term_requeues_and_resumes_exactly(cluster, tmp_path, sft_data,
                                                                    sft_reference):
    """Instruction tuning (LoRA on a locally saved Llama, packed chat examples, a validation loss
    every 4 steps, the best kept) through sbatch: SIGTERM, save, requeue, exact resume of every
    training loss and every eval_loss, each evaluation once."""
    job = Job(cluster, tmp_path, sets=support.sft_sets(sft_data), gpus=1,
              config=support.SFT_CONFIG, env=support.PACED)
    job.wait_step(RNG.randint(2, 18))
    job.term()
    assert job.wait_end() == ("COMPLETED", 1), job.logs()
    reference = sft_reference(1)
    assert_exact(job, support.losses(reference))
    evals = [(r["step"], r["eval_loss"]) for r in support.metrics(job.run_dir) if "eval_loss" in r]
    assert evals == [(r["step"], r["eval_loss"]) for r in support.metrics(reference)
                     if "eval_loss" in r]
    assert_requeue_trail(job, ["user"])


def test_the_bridge_on_two_ranks_scancel_term_requeues_and_resumes_exactly(
        cluster, tmp_path, bridge_toy, bridge_reference):
    """A model and a dataset of the user's code (examples/bridge: two frozen LMs, a trained
    bridge) through sbatch on two ranks: SIGTERM at a random step, save, requeue, every loss
    and the samples each rank's forward received as in the uninterrupted run."""
    from tests.integration.test_module import samples

    reference = bridge_reference(2)
    job = Job(cluster, tmp_path, sets=support.bridge_sets(bridge_toy, tmp_path / "samples"),
              gpus=2, config=support.BRIDGE_CONFIG, env=support.PACED)
    job.wait_step(RNG.randint(2, 12))
    job.term()
    assert job.wait_end() == ("COMPLETED", 1), job.logs()
    assert_exact(job, support.losses(reference))
    assert samples(tmp_path / "samples") == samples(reference.parent / "samples")
    assert_requeue_trail(job, ["user"])


def test_two_preemptions_by_scancel_give_restart_two(cluster, tmp_path, reference):
    job = Job(cluster, tmp_path, gpus=1)
    first, second = sorted(RNG.sample(range(5, 45), 2))
    job.wait_step(first)
    job.term()
    assert job.wait_restarts(1) not in ENDED  # requeued: COMPLETING, REQUEUED, PENDING, RUNNING
    job.wait_step(max(second, support.events(job.run_dir, "preempted")[0]["step"] + 3))
    job.term()
    assert job.wait_end() == ("COMPLETED", 2), job.logs()
    assert_exact(job, reference(1))
    assert_requeue_trail(job, ["user", "user"])
    assert support.metrics(job.run_dir)[-1]["restart"] == 2


def test_time_limit_warning_saves_and_requeues_across_allocations(cluster, tmp_path):
    # --signal=TERM@10 with a 1-minute limit: the warning comes 20-50 s into each allocation
    # (slurmctld checks every 30 s). Every step sleeps 0.2 s (a real sleep in the step, not in
    # the maths), so the 260 steps take more than 52 s however fast this machine is: the run
    # cannot finish before the first warning, and it needs at least two allocations.
    # TensorBoard on: its relay runs under srun and ends within the signal's lead every time.
    job = Job(cluster, tmp_path, gpus=1, sets=["train.steps=260", "checkpoint.every_steps=100",
                                              "train.log_every=100", "slurm.signal_lead_s=10",
                                              "track.tensorboard=true"],
              sbatch_args=["--time=1", "--signal=TERM@10"],
              env={"TELEPATHY_FAULT": "step.start@*,sleep=0.2"})
    state, restarts = job.wait_end(timeout=600)
    assert state == "COMPLETED" and restarts >= 1, job.logs()
    assert_requeue_trail(job, ["time_limit"] * restarts)
    steps = sorted(support.losses(job.run_dir))
    assert steps == list(range(1, 261))
    acc = EventAccumulator(str(job.run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == steps  # one curve, each step once
    assert [e["restart"] for e in support.events(job.run_dir, "tracking")] == \
        list(range(restarts + 1))  # a relay in every allocation


def test_scancel_term_then_a_high_priority_job_each_save_requeue_and_resume_exactly(
        cluster, tmp_path, reference):
    """Two ranks. `scancel -s TERM` at a random step: saved, requeued under the same id, resumed
    exactly. Then a job of the `high` partition preempts it: saved within the grace time (the
    ranks leave by themselves with 75, SLURM does not kill them), requeued once the high job
    ran, resumed exactly again."""
    job = Job(cluster, tmp_path, gpus=2)
    job.wait_step(RNG.randrange(5, 30))
    job.term()
    assert job.wait_restarts(1) not in ENDED, job.logs()  # requeued
    deadline = time.monotonic() + 180
    while not support.events(job.run_dir, "resume"):
        assert time.monotonic() < deadline, job.logs()
        time.sleep(0.2)
    resumed = support.events(job.run_dir, "resume")[0]["step"]
    job.wait_step(resumed + RNG.randrange(2, 10))
    high = scontrol.sbatch(None, ["-p", "high", "--gpus-per-node=h100:4",
                                  f"--output={tmp_path}/high.out", "--wrap", "sleep 5"],
                           env=cluster.env(), cwd=str(tmp_path))
    assert job.wait_end() == ("COMPLETED", 2), job.logs()
    assert scontrol.job_state(high, env=cluster.env())[0] == "COMPLETED"
    assert_exact(job, reference(2))
    assert_requeue_trail(job, ["user", "preemption"])
    after = [r for r in support.metrics(job.run_dir) if resumed < r["step"]]
    assert after and {(r["world_size"], r["job_id"]) for r in after} == {(2, job.id)}
    assert {r["restart"] for r in after} == {1, 2}
    # Saved within the grace time: the ranks left by themselves (75), SLURM did not kill them.
    ends = support.events(job.run_dir, "allocation_end")
    assert [e["exit_code"] for e in ends] == [75, 75, 0], job.logs()[-3000:]
    high_start = scontrol.show_job(high, env=cluster.env())["StartTime"]
    second = support.events(job.run_dir, "resume")[1]
    assert time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second["time"])) >= high_start


def test_crash_loop_stops_requeueing_with_a_clear_message(cluster, tmp_path):
    job = Job(cluster, tmp_path, gpus=1, sets=["preemption.crash_loop_limit=2"],
              env={"TELEPATHY_FAULT": "step.exception@25"})
    state, restarts = job.wait_end()
    assert (state, restarts) == ("FAILED", 2), job.logs()
    refused, = support.events(job.run_dir, "requeue_refused")
    assert ("crash loop: the last 2 allocations all failed without getting past the checkpoint "
            "of step 20") in refused["reason"]
    assert [e["exit_code"] for e in support.events(job.run_dir, "allocation_end")] == [1, 1, 1]
    assert "crash loop" in job.logs()


def test_a_second_live_job_on_the_same_run_directory_is_refused(cluster, tmp_path):
    long = ["train.steps=3000", "checkpoint.every_steps=20"]  # outlives the second job
    first = Job(cluster, tmp_path, gpus=1, sets=long)
    first.wait_step(1)
    second = Job(cluster, tmp_path, gpus=1, sets=long, name="second", run_dir=first.run_dir)
    assert second.wait_end()[0] == "FAILED"
    assert f"run directory {first.run_dir} is in use by a live job" in second.logs()
    assert f'"job_id": "{first.id}"' in second.logs()
    assert first.state()[0] == "RUNNING"
    # A job killed outright cannot leave the lock stuck: the next one takes over the run.
    saved = first.wait_step(25) and max(support.events(first.run_dir, "checkpoint_saved"),
                                         key=lambda e: e["step"])["step"]
    scontrol.scancel(first.id, signal="KILL", env=cluster.env())
    assert first.wait_end()[0] in ("CANCELLED", "FAILED")
    third = Job(cluster, tmp_path, gpus=1, sets=long, name="third", run_dir=first.run_dir)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not [
            e for e in support.events(first.run_dir, "resume") if e["job_id"] == third.id]:
        time.sleep(0.5)
    resume, = [e for e in support.events(first.run_dir, "resume") if e["job_id"] == third.id]
    assert resume["step"] >= saved, third.logs()
    scontrol.scancel(third.id, env=cluster.env())
