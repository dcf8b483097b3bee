"""The one module that runs other programs: argument lists, timeouts, errors that carry stderr."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence


class CommandError(RuntimeError):
    def __init__(self, cmd: Sequence[str], returncode: int | None, stderr: str):
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr
        what = "timed out" if returncode is None else f"exited with {returncode}"
        super().__init__(f"command {' '.join(self.cmd)!r} {what}: {stderr.strip()[-2000:]}")


def run(cmd: Sequence[str], timeout: float, env: Mapping[str, str] | None = None,
        check: bool = True, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion and capture its output."""
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                                env=None if env is None else dict(env), cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise CommandError(cmd, None, stderr) from None
    except FileNotFoundError as exc:
        raise CommandError(cmd, 127, str(exc)) from None
    if check and result.returncode != 0:
        raise CommandError(cmd, result.returncode, result.stderr)
    return result


def spawn(cmd: Sequence[str], log_path: str | os.PathLike | None = None,
          env: Mapping[str, str] | None = None, stdin_pipe: bool = False) -> subprocess.Popen:
    """Start a long-running child in its own process group; its output goes to `log_path`
    (`stdin_pipe`: its stdin a pipe, whose closing tells it to finish)."""
    stdin = subprocess.PIPE if stdin_pipe else None
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=stdin,
                                env=None if env is None else dict(env), start_new_session=True)
    finally:
        if log_path is not None:
            out.close()


def wait(child: subprocess.Popen, timeout_s: float) -> bool:
    """Whether the child ended within the timeout."""
    try:
        child.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True
