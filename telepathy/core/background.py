"""A daemon thread that runs a loop until stopped: the system monitor and the hang watchdog."""

from __future__ import annotations

import threading


class Background:
    """Subclasses define `_run`, which returns once `self._stop` is set."""

    thread_name = "telepathy-background"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        raise NotImplementedError

    def start(self):  # -> the subclass
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
