"""telepathy.launch without SLURM: submitit's local executor (its time limit, its restarts) and
its debug executor, driven through the CLI as a user would."""

import json
import os
import subprocess
import sys

from tests import support
from tests.support import CONFIG, ROOT, SETS


def launch(tmp_path, *args, env=None):
    cmd = [sys.executable, "-m", "telepathy.launch", "--config", CONFIG, "--run-dir",
           str(tmp_path / "run"), "--interval", "2", *[a for s in SETS for a in ("--set", s)],
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def test_local_executor_time_limit_mid_training_resumes_exactly(tmp_path, reference):
    # A 1-minute limit with the grace signal 15 s before it; 0.8 s more per step (a real sleep
    # in the step, not in the maths) makes 60 steps (48 s) outlast the first allocation's 45 s
    # however fast the machine, and leaves each allocation 45 s less its start-up: submitit's
    # local controller runs a job at most 6 times, which a loaded machine (start-up 25 s) must
    # still fit.
    out = launch(tmp_path, "--executor", "local", "--gpus", "2", "--wait",
                 "--set", "slurm.time_limit_min=1", "--set", "slurm.signal_lead_s=15",
                 env={"TELEPATHY_FAULT": "step.start@*,sleep=0.8"})
    run_dir = tmp_path / "run"
    assert out.returncode == 0, out.stdout + out.stderr
    assert "submitit folder: " + str(run_dir / "submitit") in out.stdout
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["status"] == "finished" and summary["step"] == 60
    assert summary["restarts"] >= 1 and summary["job_id"].startswith("local-")
    got, ref = support.losses(run_dir), reference(2)
    assert sorted(got) == sorted(ref) and [s for s in ref if got[s] != ref[s]] == []
    requeues = support.events(run_dir, "requeue")
    assert [(e["cause"], e["signal"]) for e in requeues] == [("time_limit", "SIGUSR2")] * len(requeues)
    assert {e["launcher"] for e in support.events(run_dir, "launch")} == {"submitit-local"}
    assert "step 60/60 (100.0%)" in out.stdout  # --wait showed the tail view to the end


def test_debug_executor_runs_in_this_process(tmp_path, reference):
    out = launch(tmp_path, "--executor", "debug")
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["step"] == 60 and summary["loss"] == reference(1)[60]
    launch_event, = support.events(tmp_path / "run", "launch")
    assert launch_event["launcher"] == "single"  # one rank, in the CLI's own process
