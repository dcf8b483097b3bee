"""One live job per run directory: an flock that the kernel releases when its holder dies."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import RunLocked


class RunLock:
    def __init__(self, path: Path, job_id: str | None):
        self.path = path
        self.job_id = job_id
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"run directory {self.path.parent} is in use by a live job ({holder}); "
                            "wait for it, cancel it (scancel), or choose another run directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"job_id": self.job_id, "host": socket.gethostname(),
                                  "pid": os.getpid(), "since": time.time()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
