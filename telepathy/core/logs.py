"""Logging set-up for entry points. The line format is stable: the tail tool parses it."""

from __future__ import annotations

import logging
import sys
import warnings

LOG_FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"
LINE_RE = (r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d) (?P<level>[A-Z]+) \[rank (?P<rank>\d+)\] "
           r"(?P<logger>[\w.]+): (?P<message>.*)$")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def configure(rank: int = 0, level: int = logging.INFO) -> None:
    """Send telepathy's log lines to stderr; quiet the libraries' noise."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    handler.addFilter(_RankFilter(rank))
    root = logging.getLogger("telepathy")
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    root.propagate = False
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r"The pynvml package is deprecated")


def set_rank(rank: int) -> None:
    for handler in logging.getLogger("telepathy").handlers:
        for f in handler.filters:
            if isinstance(f, _RankFilter):
                f.rank = rank
    if rank != 0:
        logging.getLogger("telepathy").setLevel(logging.WARNING)


def flush() -> None:
    """Flush every handler and the standard streams (before an os._exit)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
