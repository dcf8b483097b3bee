"""Never hang, on real training processes without SLURM: the watchdog ends a rank that stopped
making progress (stacks in its log, a `hang` event, exit 124), and a rank alone out of memory at
world size 2 carries the smaller micro-batch to the next run instead of leaving the other rank in
a collective. (The same through SLURM, with srun, requeue and node failures: tests/slurm.)"""

import json
import shutil

from telepathy.core import exits
from telepathy.core.paths import RunPaths
from tests import support


def test_a_rank_stuck_in_a_step_is_ended_by_its_watchdog_and_the_run_resumes_exactly(tmp_path,
                                                                                     reference):
    run_dir = tmp_path / "run"
    # Step 25 blocks for 10 minutes: a dead NFS mount, a stuck driver. The watchdog allows 20 s
    # (step 25 lies past start-up, which would get at least 120 s).
    rc = support.run(run_dir, sets=["train.hang_timeout_s=20"],
                     env={"TELEPATHY_FAULT": "step.start@25,sleep=600"})
    log = support.log_text(run_dir)
    assert rc == exits.HUNG, log[-3000:]
    hang, = support.events(run_dir, "hang")
    assert (hang["rank"], hang["step"], hang["where"]) == (0, 24, "training step 25")
    assert "faults.py" in hang["frame"] and "in train_step" in hang["frame"]
    assert hang["allowance_s"] == 20 and hang["idle_s"] >= 20  # not before the timeout
    assert "HANG: rank 0 made no progress" in log
    assert "most recent call first" in log and "telepathy/testing/faults.py" in log  # the stacks
    # The same command again resumes from the checkpoint of step 20 and matches the reference.
    assert support.run(run_dir) == 0, support.log_text(run_dir)[-3000:]
    assert support.events(run_dir, "resume")[0]["step"] == 20
    support.assert_same_losses(run_dir, reference(1))


def test_one_rank_out_of_memory_ends_the_allocation_and_carries_the_smaller_micro_batch(tmp_path,
                                                                                        reference):
    run_dir = tmp_path / "run"
    # Rank 1 alone runs out of memory inside step 30, after its forward pass: rank 0 is already
    # in the step's collectives. (The error is raised as CUDA raises it: a fake of a GPU's memory.)
    rc = support.run(run_dir, world=2, env={"TELEPATHY_FAULT": "step.oom@30:1,times=1"})
    assert rc != 0, support.log_text(run_dir)[-3000:]
    oom, = support.events(run_dir, "oom")
    assert (oom["rank"], oom["step"], oom["micro_batch"], oom["accum"], oom["next_micro_batch"],
            oom["next_accum"]) == (1, 30, 4, 1, 2, 2)
    carry, = json.loads(RunPaths.at(run_dir).plan_carry.read_text())["carries"]
    assert (carry["from_step"], carry["micro_batch"], carry["accum"], carry["rank"]) == (30, 2, 2, 1)
    assert not support.events(run_dir, "oom_recovered")  # no retry beside a waiting rank
    # The next run resumes from step 20: steps 21-29 as before (micro-batch 4), then the carried
    # micro-batch 2 x 2 from step 30 on (logged in the launch event's notes).
    assert support.run(run_dir, world=2) == 0, support.log_text(run_dir)[-3000:]
    second = support.events(run_dir, "launch")[-1]
    assert any("micro-batch at most 2 from step 30" in n for n in second["plan_notes"])
    rows = {r["step"]: r for r in support.metrics(run_dir) if r["restart"] == 1}
    assert {(rows[s]["micro_batch"], rows[s]["accum"]) for s in range(21, 30)} == {(4, 1)}
    assert {(rows[s]["micro_batch"], rows[s]["accum"]) for s in range(30, 61)} == {(2, 2)}
    # Bit for bit with the uninterrupted run up to step 29; from 30 on, the same samples summed
    # in another order (within 1e-5)...
    support.assert_close_losses(support.losses(run_dir), reference(2), exact_until=29)
    # ...and bit for bit with an uninterrupted run given the same plan: the crash, the resume
    # from step 20 and the switch at step 30 changed nothing else.
    same_plan = tmp_path / "same-plan"
    same_plan.mkdir()
    shutil.copy(RunPaths.at(run_dir).plan_carry, RunPaths.at(same_plan).plan_carry)
    assert support.run(same_plan, world=2) == 0, support.log_text(same_plan)[-3000:]
    support.assert_same_losses(run_dir, support.losses(same_plan))


def test_time_a_process_lay_stopped_is_nobodys_hang():
    """SIGSTOP for longer than the timeout, then SIGCONT (scontrol suspend/resume does this):
    the watchdog counts idle time again from the wake-up instead of firing at once. The child's
    steps are lines this test writes; after the SIGCONT none comes, so it fires in the end, and
    the idle time it reports is what passed since the wake-up, not the time it lay stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys\n"
        "from telepathy.train.watchdog import Watchdog\n"
        "dog = Watchdog(2.0, backstop=False,\n"
        "               on_hang=lambda h: print(f'idle_s={h.idle_s}', flush=True)).start()\n"
        "for line in sys.stdin:\n"
        "    dog.progress()\n"
        "dog.stop()\n")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=support.ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(10):  # imported and stepping
        child.stdin.write("step\n")
        child.stdin.flush()
        time.sleep(0.3)
    os.kill(child.pid, signal.SIGSTOP)
    time.sleep(8)
    os.kill(child.pid, signal.SIGCONT)
    rc = child.wait(120)  # stdin stays open: no more steps
    out, err = child.stdout.read(), child.stderr.read()
    child.stdin.close()
    assert rc == exits.HUNG, err[-2000:]
    idle_s = float(out.split("idle_s=")[1])
    assert 2.0 < idle_s < 8, f"the 8 s it lay stopped counted as idle: {out}"
