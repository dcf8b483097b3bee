"""The sbatch template says what the code expects: signal, lead time, requeue, appended logs."""

import re
import subprocess
import sys

from telepathy.config import load_config
from telepathy.errors import RunLocked
from telepathy.runlock import RunLock
from tests.helpers import ROOT

SCRIPT = ROOT / "slurm" / "preemptible.slurm"


def directives():
    lines = [l for l in SCRIPT.read_text().splitlines() if l.startswith("#SBATCH")]
    return {m.group(1): (m.group(2), m.group(3)) for m in
            (re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?\s*(#.*)?$", l) for l in lines)}


def test_every_directive_is_explained_by_a_comment():
    for name, (_, comment) in directives().items():
        assert comment and len(comment) > 10, f"--{name} has no comment"


def test_grace_signal_matches_the_production_config():
    cfg = load_config(ROOT / "configs" / "llama-1b-h100.yaml")
    signal, lead = directives()["signal"][0].split("@")
    assert not signal.startswith("B:"), "the warning must reach the srun ranks, not the batch shell"
    assert f"SIG{signal}" in cfg.preemption.signals and int(lead) == cfg.slurm.signal_lead_s


def test_requeue_append_and_one_rank_per_gpu():
    d = directives()
    assert "requeue" in d and d["open-mode"][0] == "append"
    assert d["output"][0] == "runs/logs/%x-%j.out" and d["error"][0] == "runs/logs/%x-%j.err"
    assert d["gpus-per-node"][0] == "h100:4"
    text = SCRIPT.read_text()
    assert 'srun --ntasks-per-node="$ranks"' in text and "--kill-on-bad-exit=1" in text
    assert "-m telepathy.resume" in text and "-m telepathy.requeue" in text
    assert (ROOT / "runs" / "logs").is_dir(), "sbatch does not create the output directory"


def test_run_lock_is_exclusive_and_released_when_its_holder_is_killed(tmp_path):
    lock_file = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from telepathy.runlock import RunLock
RunLock(__import__('pathlib').Path({str(lock_file)!r}), "4242").acquire()
print("held", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, cwd=ROOT)
    assert holder.stdout.readline().strip() == b"held"
    try:
        RunLock(lock_file, "1").acquire()
        raise AssertionError("a second holder got the lock")
    except RunLocked as exc:
        assert '"job_id": "4242"' in str(exc) and "choose another run directory" in str(exc)
    holder.kill()
    holder.wait()
    with RunLock(lock_file, "2"):
        assert '"job_id": "2"' in lock_file.read_text()
