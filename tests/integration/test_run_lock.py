"""The run lock: one live job per run directory, released by the kernel when its holder dies."""

import subprocess
import sys

from telepathy.core.errors import RunLocked
from telepathy.core.runlock import RunLock
from tests.support import ROOT


def test_run_lock_is_exclusive_and_released_when_its_holder_is_killed(tmp_path):
    lock_file = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from telepathy.core.runlock import RunLock
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
