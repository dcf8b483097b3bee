"""The hang watchdog: a thread on every rank that ends a rank which stopped making progress.

A rank makes progress when an optimizer step completes, a save writes a file, or a start-up
phase ends. When none of that happens for the current allowance (`train.hang_timeout_s`, or more
for start-up with the first step and for a save, from their measured durations), the watchdog
writes every thread's Python stack to the rank's log (`faulthandler`), reports the hang (a
`hang` event naming the rank, what it was doing and its innermost frame), and ends the process
with `exits.HUNG` (124). srun's `--kill-on-bad-exit` then stops the other ranks and the job's
requeue step requeues it.

This catches what a collective timeout cannot: a rank stopped (SIGSTOP, a dead NFS mount, a
stuck driver) leaves the others waiting in a collective that gloo gives up on after 30 minutes
and NCCL after 10, with no word on where. faulthandler's own timer (a C thread that needs no GIL)
is armed a little after the allowance as a backstop for a rank whose Python threads cannot run.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from ..core import exits, logs
from ..core.background import Background

log = logging.getLogger(__name__)

FIRE_DEADLINE_S = 30
"""Seconds the watchdog gives its own report (log, stacks, event) before SIGALRM ends the rank."""


@dataclass(frozen=True)
class Hang:
    """What the watchdog saw when it fired: the fields of a `hang` event."""

    step: int
    """The last optimizer step this rank completed."""
    rank: int
    where: str
    """What the rank was doing: a start-up phase, a step, a save, waiting for a save."""
    frame: str
    """The main thread's innermost Python frames: file:line in function, innermost first."""
    idle_s: float
    allowance_s: float

    def fields(self) -> dict[str, Any]:
        import socket

        return {"step": self.step, "rank": self.rank, "where": self.where, "frame": self.frame,
                "idle_s": round(self.idle_s, 1), "allowance_s": round(self.allowance_s, 1),
                "pid": os.getpid(), "host": socket.gethostname()}


def main_thread_frame(depth: int = 4) -> str:
    """Where the main thread is: its `depth` innermost frames, innermost first."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    where = []
    while frame is not None and len(where) < depth:
        where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    return " <- ".join(where) or "unknown"


class Watchdog(Background):
    """Start with `start()`; the training process calls `expect` when it enters a phase with its
    own allowance and `progress` whenever work is done (from any thread)."""

    thread_name = "telepathy-watchdog"

    def __init__(self, timeout_s: float, rank: int = 0,
                 on_hang: Callable[[Hang], None] = lambda hang: None,
                 out: TextIO | None = None, exit_code: int = exits.HUNG, backstop: bool = True,
                 exit: Callable[[int], None] = os._exit,
                 clock: Callable[[], float] = time.monotonic):
        self.timeout_s = timeout_s
        self.clock = clock
        """Seconds, monotonic: time.monotonic, or a test's hand-moved clock."""
        self.rank = rank
        self.on_hang = on_hang
        self.out = out
        self.exit_code = exit_code
        self.backstop = backstop
        self._exit = exit
        self.where = "start-up"
        self.allowance_s = timeout_s
        self.step = 0
        self._last = clock()
        self._polled = self._last
        self._lock = threading.Lock()
        """Keeps (where, allowance, last) consistent between the trainer and this thread."""
        self._armed_at: float | None = None
        super().__init__()
        self.poll_s = min(1.0, timeout_s / 20)
        self.fired: Hang | None = None

    # -- called by the training process ---------------------------------------------------------
    def expect(self, where: str, allowance_s: float | None = None) -> None:
        """Enter a phase: `where` names it; it may last max(timeout, allowance_s) without
        progress. Counts as progress."""
        with self._lock:
            self.where = where
            self.allowance_s = max(self.timeout_s, allowance_s or 0.0)
            self._last = self.clock()

    def progress(self, step: int | None = None) -> None:
        """Work was done (a step completed: pass it; a file written). Thread-safe."""
        with self._lock:
            if step is not None:
                self.step = step
            self._last = self.clock()

    # -- the thread -----------------------------------------------------------------------------
    def stop(self) -> None:
        super().stop()
        if self.backstop and self._armed_at is not None:
            faulthandler.cancel_dump_traceback_later()
            self._armed_at = None

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        self._polled = self.clock()
        while not self._stop.wait(self.poll_s):
            if self.check():
                return

    def check(self) -> bool:
        """One look (the thread's loop makes one every `poll_s`): fire when the rank has been
        idle past its allowance; True once fired."""
        now = self.clock()
        if now - self._polled > max(5.0, 10 * self.poll_s):
            # This process was stopped (SIGSTOP then SIGCONT, scontrol suspend/resume): the
            # time it lay still is nobody's hang. Start counting again.
            self.progress()
        self._polled = now
        with self._lock:
            last, allowance = self._last, self.allowance_s
        idle = now - last
        if idle > allowance:
            self._fire(idle, allowance)
            return True
        if self.backstop and self._armed_at != last:
            # The C timer: stacks and exit 1 if this thread cannot run (the GIL never freed).
            faulthandler.dump_traceback_later(allowance - idle + max(30.0, allowance / 4),
                                              exit=True, file=self._stream())
            self._armed_at = last
        return False

    def _stream(self) -> TextIO:
        return self.out or sys.__stderr__

    def _fire(self, idle: float, allowance: float) -> None:
        # Whatever below blocks (a log on a dead NFS mount is the very case), the process ends:
        # SIGALRM's default action needs no I/O and no GIL.
        signal.alarm(FIRE_DEADLINE_S)
        hang = Hang(self.step, self.rank, self.where, main_thread_frame(), idle, allowance)
        self.fired = hang
        if self.backstop:
            faulthandler.cancel_dump_traceback_later()
        log.error("HANG: rank %d made no progress for %.1f s (allowed %.1f s, train.hang_timeout_s="
                  "%g) while %s, after step %d, at %s. Every thread's stack follows; this rank "
                  "exits with %d so that the job is requeued", self.rank, idle, allowance,
                  self.timeout_s, self.where, self.step, hang.frame, self.exit_code)
        stream = self._stream()
        try:
            stream.flush()
            faulthandler.dump_traceback(file=stream, all_threads=True)
            stream.flush()
        except (OSError, ValueError) as exc:
            log.error("could not write the stacks: %s", exc)
        try:
            self.on_hang(hang)
        except Exception as exc:  # the exit matters more than the record
            log.error("could not record the hang: %s", exc)
        logs.flush()
        self._exit(self.exit_code)
        signal.alarm(0)  # (only reached when `exit` is not os._exit: tests)
