"""Acceptance of telepathy.launch against the real local SLURM cluster: submitit's executor
submits, SLURM signals, preempts and requeues, `job.results()` reads the result files."""

import json
import subprocess
import sys
import time

import pytest
import submitit

import telepathy.launch
from telepathy.core.errors import TelepathyError
from telepathy.core.jsonl import wait_for_step
from telepathy.slurm import scontrol
from telepathy.slurm.jobspec import sbatch_args
from tests import support
from tests.support import CONFIG, RNG, ROOT, SETS

pytestmark = pytest.mark.slurm


@pytest.fixture
def slurm_env(cluster, monkeypatch):
    """This test process submits to the local cluster (submitit runs sbatch with os.environ)."""
    for key, value in cluster.env().items():
        monkeypatch.setenv(key, value)
    return cluster


def results(job, timeout=420):
    """job.results(), but a test fails instead of waiting forever."""
    deadline = time.monotonic() + timeout
    while not job.done():
        assert time.monotonic() < deadline, f"job {job.job_id} not done: {job.state}\n{logs(job)}"
        time.sleep(1)
    return job.results()


def final_state(job, timeout=120):
    """The job's state once SLURM has ended it, asked through submitit's own watcher (which
    here, without accounting, falls back to scontrol)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job.get_info(mode="force").get("State", "UNKNOWN")
        if state not in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED", "UNKNOWN"):
            return state
        time.sleep(1)
    raise TimeoutError(f"job {job.job_id} still {job.state}")


def logs(job):
    paths = [job.paths.stdout, job.paths.stderr] if job.num_tasks == 1 else \
        [p for t in range(job.num_tasks) for p in (job.task(t).paths.stdout, job.task(t).paths.stderr)]
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in paths if p.exists())


def assert_exact(run_dir, reference):
    got = support.losses(run_dir)
    assert sorted(got) == sorted(reference)
    assert [s for s in reference if got[s] != reference[s]] == [], "losses differ after the resume"


def requeues(run_dir):
    return [(e["cause"], e["slurm_restart_count"]) for e in support.events(run_dir, "requeue")]


def test_scancel_then_the_high_partition_preempt_requeue_resume_exactly_and_results_returns(
        slurm_env, tmp_path, monkeypatch, bridge_toy, bridge_reference):
    """Two preemptions of a submitit job on two ranks, one by `scancel -s TERM`, one by a job of
    the `high` partition: each saved, requeued under the same id and resumed exactly;
    `job.results()` returns rank 0's summary. The job trains a model and a dataset of the user's
    own code (examples/bridge: two frozen LMs and a bridge between them)."""
    monkeypatch.setenv("TELEPATHY_FAULT", support.PACED["TELEPATHY_FAULT"])  # the job inherits it
    reference = support.losses(bridge_reference(2))
    sets = support.bridge_sets(bridge_toy)
    run_dir = tmp_path / "run"
    job = telepathy.launch.submit(support.BRIDGE_CONFIG, run_dir, gpus=2, overrides=sets)
    assert isinstance(job, submitit.Job) and job.num_tasks == 2
    # The job asks for what slurm/preemptible.slurm asks for, from the same config fields.
    script = job.paths.submission_file.read_text()
    cfg = telepathy.launch.api._config(support.BRIDGE_CONFIG, sets)
    for arg in [*sbatch_args(cfg, 2), "--requeue", "--ntasks-per-node=2", "--open-mode=append"]:
        assert f"#SBATCH {arg}\n" in script
    assert "--kill-on-bad-exit=1" in script and "-m telepathy.launch.node" in script
    wait_for_step(run_dir / "metrics.jsonl", RNG.randrange(3, 9), 240)
    scontrol.scancel(job.job_id, signal="TERM")
    deadline = time.monotonic() + 180
    while not support.events(run_dir, "resume"):
        assert time.monotonic() < deadline, logs(job)
        time.sleep(0.2)
    resumed = support.events(run_dir, "resume")[0]["step"]
    wait_for_step(run_dir / "metrics.jsonl", resumed + RNG.randrange(2, 6), 240)
    high = scontrol.sbatch(None, ["-p", "high", "--gpus-per-node=h100:4",
                                  f"--output={tmp_path}/high.out", "--wrap", "sleep 5"],
                           cwd=str(tmp_path))
    summary, other = results(job)
    assert final_state(job) == "COMPLETED"  # followed without sacct (no accounting here)
    assert other is None
    assert summary["status"] == "finished" and summary["step"] == 24
    assert summary["restarts"] == 2 and summary["run_dir"] == str(run_dir)
    assert summary["loss"] == reference[24] and summary["job_id"] == job.job_id
    assert scontrol.job_state(high)[0] == "COMPLETED"
    assert_exact(run_dir, reference)
    assert requeues(run_dir) == [("user", 0), ("preemption", 1)]
    events = support.events(run_dir)
    assert {e["job_id"] for e in events} == {job.job_id}  # requeued under the same id
    launches = support.events(run_dir, "launch")
    assert [e["launcher"] for e in launches] == ["submitit-slurm"] * 3
    assert launches[0]["stdout"] == str(job.task(0).paths.stdout)  # tail finds the log
    assert [e["exit_code"] for e in support.events(run_dir, "allocation_end")] == [75, 75, 0]


def test_signals_during_start_up_are_kept_then_a_refused_requeue_ends_results_with_the_reason(
        slurm_env, tmp_path, reference):
    """SIGTERM in the first allocation's start-up, submitit's SIGUSR2 in the second's: each is
    kept until the first step boundary, saved and requeued (not a crash). With
    preemption.max_restarts=2, a third SIGTERM mid-run is saved but not requeued: results()
    raises telepathy's reason at once (no SLURM accounting needed), and the run directory
    still resumes exactly through a new submission."""
    run_dir = tmp_path / "run"
    job = telepathy.launch.submit(CONFIG, run_dir, gpus=1,
                                  overrides=[*SETS, "preemption.max_restarts=2"])
    for restart, sig in enumerate(["TERM", "USR2"]):
        deadline = time.monotonic() + 180
        # submitit logs this line once telepathy's handlers are in place (before torch loads).
        while logs(job).count("Loading pickle") <= restart:
            assert time.monotonic() < deadline, logs(job)
            time.sleep(0.05)
        scontrol.scancel(job.job_id, signal=sig)
        while len(support.events(run_dir, "requeue")) <= restart:
            assert time.monotonic() < deadline, logs(job)
            time.sleep(0.2)
    wait_for_step(run_dir / "metrics.jsonl", RNG.randrange(5, 30), 240)
    scontrol.scancel(job.job_id, signal="TERM")
    with pytest.raises(submitit.core.utils.FailedJobError) as err:
        results(job)
    assert "not requeued: restart cap reached" in str(err.value)
    assert "stays resumable" in str(err.value)
    assert final_state(job) == "FAILED"  # the teardown step's exit status
    signals = support.events(run_dir, "signal")
    assert [e["signal"] for e in signals] == ["SIGTERM", "SIGUSR2", "SIGTERM"]
    launches = support.events(run_dir, "launch")
    for signal, launch in zip(signals[:2], launches):
        assert signal["received_at"] < launch["time"]  # it came before training started
        assert signal["step"] == 0
    assert [e["exit_code"] for e in support.events(run_dir, "allocation_end")] == [75, 75, 75]
    again = telepathy.launch.submit(CONFIG, run_dir, gpus=1, overrides=SETS)
    summary, = results(again)
    assert summary["step"] == 60 and support.events(run_dir, "resume")[-1]["job_id"] == again.job_id
    assert_exact(run_dir, reference(1))


def test_bad_input_raises_before_anything_is_queued(slurm_env, tmp_path):
    def queued():
        return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                              check=True).stdout.split()

    before = queued()
    for sets, why in [(["train.global_batch=0"], "train.global_batch"),
                      (["data.path=" + str(tmp_path / "missing.bin")], "missing.bin")]:
        with pytest.raises(TelepathyError) as err:
            telepathy.launch.submit(CONFIG, tmp_path / "run", gpus=2, overrides=[*SETS, *sets])
        assert why in str(err.value)
        # The very message `telepathy resume` gives for the same input.
        resume = subprocess.run([sys.executable, "-m", "telepathy.resume", "--config", CONFIG,
                                 "--run-dir", str(tmp_path / "direct"), *[a for s in [*SETS, *sets]
                                                                          for a in ("--set", s)]],
                                capture_output=True, text=True, cwd=ROOT)
        assert resume.returncode == 2 and str(err.value) in resume.stderr
    with pytest.raises(TelepathyError, match="gpus=5"):
        telepathy.launch.submit(CONFIG, tmp_path / "run", gpus=5, overrides=SETS)
    with pytest.raises(TelepathyError, match="executor='pbs'"):
        telepathy.launch.submit(CONFIG, tmp_path / "run", executor="pbs")
    for nodes, kwargs, why in [(0, {}, "nodes=0: give a whole number"),
                               ("1-2", {}, "sbatch --nodes=1-2"),
                               (2, {"executor": "local"}, "runs on this machine alone"),
                               (2, {"gpus": "auto"}, "gpus='auto' with nodes=2")]:
        with pytest.raises(TelepathyError, match=why):
            telepathy.launch.submit(CONFIG, tmp_path / "run", nodes=nodes, overrides=SETS,
                                    **kwargs)
    assert queued() == before
    assert not (tmp_path / "run" / "submitit").exists()


def test_gpus_auto_takes_the_plans_choice_and_a_cancelled_job_does_not_hang(slurm_env, tmp_path):
    plan = subprocess.run([sys.executable, "-m", "telepathy.plan", "--config", CONFIG, "--slurm",
                           "--json", *[a for s in SETS for a in ("--set", s)]],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    recommended = json.loads(plan.stdout)["recommended_gpus"]
    job = telepathy.launch.submit(CONFIG, tmp_path / "run", gpus="auto", overrides=SETS)
    assert job.num_tasks == recommended
    assert f"#SBATCH --gpus-per-node=h100:{recommended}\n" in job.paths.submission_file.read_text()
    scontrol.scancel(job.job_id)  # no signal to save on: the job is simply gone
    assert final_state(job) == "CANCELLED"
    with pytest.raises(submitit.core.utils.UncompletedJobError):  # raised, never a wait forever
        results(job, timeout=120)
