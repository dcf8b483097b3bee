"""Rank 0's handle on its relay process: started after the resume point is known, ended (stdin
closed, then at most `track.flush_s` to finish) when training ends."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..core import proc

log = logging.getLogger(__name__)


class RelayProcess:
    def __init__(self, popen: Any, flush_s: float):
        """`popen`: the subprocess.Popen of core.proc.spawn."""
        self.popen = popen
        self.flush_s = flush_s

    @classmethod
    def start(cls, run_dir: Path, restart: int, resume_step: int, job_id: str | None,
              world_size: int, flush_s: float, log_path: Path) -> RelayProcess:
        cmd = [sys.executable, "-m", "telepathy.track.relay", str(run_dir), "--restart",
               str(restart), "--resume-step", str(resume_step), "--world-size", str(world_size)]
        if job_id:
            cmd += ["--job-id", str(job_id)]
        return cls(proc.spawn(cmd, log_path, stdin_pipe=True), flush_s)

    def stop(self, budget_s: float | None = None) -> None:
        """Let the relay send what is left, for at most `budget_s` (default flush_s); then it
        and its children (wandb-core) are killed, and the next allocation sends the rest. Once:
        later calls return at once."""
        if self.popen.poll() is not None or self.popen.stdin is None or self.popen.stdin.closed:
            return
        try:
            self.popen.stdin.close()
        except OSError:
            pass
        budget = self.flush_s if budget_s is None else budget_s
        if not proc.wait(self.popen, budget):
            log.warning("the tracker relay (pid %d) did not finish within %g s (track.flush_s="
                        "%g); stopped: the next allocation (or `telepathy track sync`) sends the "
                        "rest", self.popen.pid, budget, self.flush_s)
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)  # its own session: wandb-core too
            except OSError:
                self.popen.kill()
            proc.wait(self.popen, 5)
