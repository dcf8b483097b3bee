"""tail and report on real run directories, the live view in a real terminal, the monitor."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from telepathy.checkpoint.manager import fits
from telepathy.core.jsonl import last_per_step
from telepathy.watch.health import HealthLimits, conditions
from tests import support
from tests.support import ROOT


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A real run stopped by SIGTERM and resumed to the end."""
    run_dir = tmp_path_factory.mktemp("watched") / "run"
    rc, _ = support.interrupt(run_dir, 25)
    assert rc == 75, support.log_text(run_dir)
    assert support.run(run_dir) == 0, support.log_text(run_dir)
    return run_dir


def cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_tail_once_prints_plain_figures_from_the_run_files(resumed_run):
    out = cli("telepathy", "tail", str(resumed_run), "--once", "--no-slurm")
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout, "escape codes in plain output"
    rows = last_per_step(support.metrics(resumed_run))
    stopped = support.events(resumed_run, "preempted")[0]["step"]
    assert "FINISHED" in out.stdout and "step 60/60 (100.0%)" in out.stdout
    assert f"loss        {rows[60]['loss']:.4f}" in out.stdout
    assert f"restarts    1 (#0: signal SIGTERM at step {stopped})" in out.stdout
    assert "checkpoint  step 60, " in out.stdout
    assert "no GPU figures; CPU" in out.stdout  # the monitor's host sample, no GPU here


def test_tail_lists_a_directory_of_runs(resumed_run):
    out = cli("telepathy", "tail", str(resumed_run.parent), "--once")
    assert out.returncode == 0, out.stderr
    line = next(s for s in out.stdout.splitlines() if s.startswith("│ run "))
    assert "finished" in line and "60/60" in line


def test_report_json_matches_metrics_and_events(resumed_run, tmp_path):
    out = cli("telepathy", "report", str(resumed_run), "--json", "--png", str(tmp_path / "run.png"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    rows = last_per_step(support.metrics(resumed_run))
    best = min(rows.values(), key=lambda r: r["loss"])
    stopped = support.events(resumed_run, "preempted")[0]["step"]
    resumed = support.events(resumed_run, "resume")[0]["step"]
    assert report["state"] == "finished" and report["step"] == 60 and report["restarts"] == 1
    assert report["loss"] == {"first": rows[1]["loss"], "last": rows[60]["loss"],
                              "best": {"step": best["step"], "loss": best["loss"]}}
    assert [(a["start_step"], a["end_step"], a["ended"]) for a in report["allocations"]] == [
        (0, stopped, "signal SIGTERM"), (resumed, 60, "finished")]
    assert [(m["step"], m["kind"]) for m in report["markers"]] == [(stopped, "stopped"),
                                                                   (resumed, "resumed")]
    assert report["checkpoints"]["saves"] == len(support.events(resumed_run, "checkpoint_saved"))
    assert report["series"]["loss"] == [rows[s]["loss"] for s in sorted(rows)]
    from PIL import Image
    with Image.open(tmp_path / "run.png") as img:
        assert img.size == (1000, 600)


def tmux(*args):
    """tmux on a private server socket, so a user's own sessions are never touched."""
    return subprocess.run(["tmux", "-L", "telepathy-tests", *args], capture_output=True, text=True,
                          timeout=10)


@pytest.fixture
def pane(tmp_path):
    name = f"t-{os.getpid()}-{tmp_path.name}"  # one tmux server for every worker

    def start(command):
        # The command's exit status is printed into the pane, which then stays open to be read.
        script = f"cd {ROOT} && {command}; echo EXIT=$?; sleep 600"
        assert tmux("new-session", "-d", "-s", name, "-x", "130", "-y", "45", script).returncode == 0
        return name

    yield start
    tmux("kill-session", "-t", name)


def screen(name):
    return tmux("capture-pane", "-p", "-t", name).stdout


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def dead(name):
    """The exit status of the pane's command once it has ended, else None."""
    found = re.search(r"^EXIT=(\d+)$", screen(name), re.M)
    return found.group(1) if found else None


@pytest.mark.parametrize("key", ["q", "C-c"])
def test_live_view_in_a_terminal_quits_cleanly(resumed_run, pane, key):
    name = pane(f"{sys.executable} -m telepathy tail {resumed_run} --no-slurm")
    assert wait_for(lambda: "step 60/60" in screen(name)), screen(name)
    assert "FINISHED" in screen(name) and "━" in screen(name)
    tmux("send-keys", "-t", name, key)
    assert wait_for(lambda: dead(name) is not None, 10), screen(name)
    assert dead(name) == "0" and "Traceback" not in screen(name)


def test_follow_keeps_watching_across_a_requeue_until_the_run_finishes(tmp_path, pane):
    run_dir = tmp_path / "run"
    proc = support.start(run_dir)
    support.wait_for_step(run_dir / "metrics.jsonl", 10, 120)
    name = pane(f"{sys.executable} -m telepathy tail {run_dir} --follow --no-slurm --interval 0.5")
    assert wait_for(lambda: "RUNNING" in screen(name)), screen(name)
    proc.send_signal(15)
    assert support.finish(proc) == 75
    assert wait_for(lambda: "REQUEUED" in screen(name)), screen(name)
    assert dead(name) is None, "tail --follow stopped at the requeue"
    assert support.run(run_dir) == 0
    assert wait_for(lambda: dead(name) is not None, 30), screen(name)
    assert dead(name) == "0" and "FINISHED" in screen(name)


def test_health_conditions():
    limits = HealthLimits(low_util_pct=20, low_util_window_s=60, high_mem_pct=90)
    gpu = lambda util, used: {"index": 0, "util_pct": util, "mem_used_gb": used,  # noqa: E731
                              "mem_total_gb": 80.0, "temp_c": 50.0, "power_w": 300.0}
    idle = [{"time": t, "gpus": [gpu(5, 10)]} for t in range(0, 70, 10)]
    assert list(conditions(idle, limits)) == ["gpu0_low_util"]
    assert conditions(idle[:3], limits) == {}  # not idle for long enough yet
    busy = idle[:-1] + [{"time": 60, "gpus": [gpu(95, 79)]}]
    assert list(conditions(busy, limits)) == ["gpu0_mem_full"]
    assert conditions([{"time": 0, "gpus": []}], limits) == {}
    assert fits(111, 100) and not fits(109, 100)


def test_a_checkpoint_that_cannot_fit_is_not_started_and_training_goes_on(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        run_dir = small / "run"
        assert support.run(run_dir, sets=["checkpoint.every_steps=10"]) == 0, support.log_text(run_dir)
        skipped = support.events(run_dir, "checkpoint_skipped")
        assert skipped and all(e["free_bytes"] < e["needed_bytes"] * 1.1 for e in skipped)
        assert "free on the run directory's filesystem" in support.log_text(run_dir)
        assert sorted(support.losses(run_dir)) == list(range(1, 61))
        assert support.events(run_dir, "finished")
        for ckpt in (run_dir / "checkpoints").glob("step_*"):
            assert (ckpt / "MANIFEST.json").exists()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
        shutil.rmtree(small, ignore_errors=True)
