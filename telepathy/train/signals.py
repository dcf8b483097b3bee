"""The preemption flag: signal handlers that record the signal and do nothing else."""

from __future__ import annotations

import signal
import time
from types import FrameType


class PreemptionFlag:
    """Context manager that installs handlers for `names` and restores the old ones on exit.

    The handler only stores the signal number and the time it came; the training loop reads
    `signum` at step boundaries and the ranks agree there.
    """

    def __init__(self, names: list[str]):
        self.signums = [signal.Signals[name] for name in names]
        self.signum: int | None = None
        self.received_at: float | None = None
        self.count = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self.received_at = time.time()
        self.count += 1

    @property
    def is_set(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def __enter__(self) -> PreemptionFlag:
        for signum in self.signums:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def watch(self, names: list[str]) -> None:
        """Switch to another signal set (the configured one, once the config is read)."""
        wanted = [signal.Signals[name] for name in names]
        for signum in [s for s in self._previous if s not in wanted]:
            signal.signal(signum, self._previous.pop(signum))
        for signum in [s for s in wanted if s not in self._previous]:
            self._previous[signum] = signal.signal(signum, self._handle)
        self.signums = wanted

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
