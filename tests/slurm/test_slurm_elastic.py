"""Through the local SLURM cluster: choose the GPU count with telepathy.plan, and resume a run on
a different GPU count than it was preempted on."""

import json
import subprocess
import sys
import time

import pytest
import yaml

from telepathy.core.paths import RunPaths
from telepathy.slurm import scontrol
from tests import support
from tests.support import RNG, ROOT, Job, assert_close_losses

pytestmark = pytest.mark.slurm


def test_plan_submits_one_gpu_now_over_four_later_and_the_run_resumes_on_it(
        cluster, tmp_path, reference):
    """A 2-GPU job is preempted; 3 of the 4 GPUs are then busy for an hour; telepathy.plan
    recommends and submits 1 GPU, and the run resumes there (2 -> 1 ranks) and finishes."""
    first = Job(cluster, tmp_path, gpus=2, sets=["preemption.max_restarts=0"], name="first")
    first.wait_step(RNG.randrange(21, 40))
    first.term()
    state, restarts = first.wait_end()
    assert restarts == 0 and state in ("COMPLETED", "FAILED"), first.logs()
    stopped = support.events(first.run_dir, "preempted")[-1]["step"]
    assert support.events(first.run_dir, "requeue_refused")

    blocker = scontrol.sbatch(None, ["--gpus-per-node=h100:3", "--time=60",
                                     f"--output={tmp_path}/blocker.out", "--wrap", "sleep 3600"],
                              env=cluster.env(), cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while scontrol.job_state(blocker, env=cluster.env())[0] != "RUNNING":
            assert time.monotonic() < deadline, "the blocking job did not start"
            time.sleep(0.5)
        out = subprocess.run(
            [sys.executable, "-m", "telepathy.plan", "--config", str(first.config), "--run-dir",
             str(first.run_dir), "--submit", "--json", "--set", "train.log_every=7",
             f"--sbatch-arg=--output={tmp_path}/second.out",
             f"--sbatch-arg=--error={tmp_path}/second.err"],
            capture_output=True, text=True, env=cluster.env(), cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        options = {o["gpus"]: o for o in answer["options"]}
        assert answer["remaining_steps"] == 60 - stopped
        assert answer["recommended_gpus"] == 1
        # SLURM's own estimate (sbatch --test-only): 1 GPU now, 2 or 4 after the hour's blocker
        assert options[1]["wait_s"] < 600
        assert options[2]["wait_s"] > 3000 and options[4]["wait_s"] > 3000
        assert "does not divide over 3 GPUs" in options[3]["error"]
        assert options[2]["step_source"] == "measured"  # the run's own step times at 2 GPUs
        assert options[1]["step_source"] == "scaled from 2 GPU(s)"

        second = Job(cluster, tmp_path, name="second", run_dir=first.run_dir,
                     job_id=answer["submitted_job_id"])
        assert scontrol.show_job(second.id, env=cluster.env())["TresPerNode"].endswith("gpu:h100:1")
        assert second.wait_end() == ("COMPLETED", 0), second.logs()
        # The job ran the config planned, --set included (it once got the bare YAML file).
        assert yaml.safe_load(RunPaths.at(first.run_dir).config.read_text())["train"]["log_every"] == 7
    finally:
        scontrol.scancel(blocker, env=cluster.env())

    change, = support.events(first.run_dir, "world_size_changed")
    assert (change["from_world_size"], change["to_world_size"], change["step"]) == (2, 1, stopped)
    assert {e["job_id"] for e in support.events(first.run_dir, "launch")} == {first.id, second.id}
    assert_close_losses(support.losses(first.run_dir), reference(2), exact_until=stopped)
    rows = support.metrics(first.run_dir)
    assert {r["world_size"] for r in rows if r["step"] > stopped} == {1}


def test_a_save_longer_than_the_grace_time_is_announced_loudly(cluster, tmp_path):
    """The checkpoint of step 100 is held 35 s in the background; then a high-priority job
    preempts the run, which gets GraceTime (30 s): the log says the save may not finish.

    Saves every 100 steps, and every step sleeps 0.05 s (not in the maths): the 300 steps after
    the slow save take at least 15 s however fast this machine is, so the preemption (a few
    seconds of scheduling) lands before the run ends, and before two more saves could push the
    slow one out of the window of the last three."""
    job = Job(cluster, tmp_path, gpus=1, sets=["train.steps=400", "checkpoint.every_steps=100"],
              env={"TELEPATHY_FAULT": "save.file_written@100,sleep=35;step.start@*,sleep=0.05"})
    deadline = time.monotonic() + 240
    while not [e for e in support.events(job.run_dir, "checkpoint_saved") if e["step"] == 100]:
        assert time.monotonic() < deadline, job.logs()
        time.sleep(0.5)
    high = scontrol.sbatch(None, ["-p", "high", "--gpus-per-node=h100:4",
                                  f"--output={tmp_path}/high.out", "--wrap", "sleep 5"],
                           env=cluster.env(), cwd=str(tmp_path))
    assert job.wait_end() == ("COMPLETED", 1), job.logs()
    assert scontrol.job_state(high, env=cluster.env())[0] == "COMPLETED"
    risk, = support.events(job.run_dir, "save_deadline_risk")
    assert risk["expected_save_s"] >= 35 and risk["time_left_s"] <= cluster.grace_s
    assert "the final save may not finish: recent saves took up to" in job.logs()
    assert sorted(support.losses(job.run_dir)) == list(range(1, 401))
