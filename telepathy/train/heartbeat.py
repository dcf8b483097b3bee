"""Node heartbeats: on a job of several nodes, a node that vanishes without a word ends the
allocation within `train.node_timeout_s`, not at the hang watchdog's timeout.

A node whose processes die while its kernel lives (killed, out of memory, its slurmd gone)
closes their TCP connections: the ranks elsewhere get "Connection closed by peer" at their next
collective and leave at once. A node that vanishes (power lost, a kernel panic, a cut link)
closes nothing: the ranks elsewhere wait in a collective, until the watchdog's
`train.hang_timeout_s` (minutes) or SLURM's own notice (SlurmdTimeout, 300 s by default).

So, on a job whose ranks span several hosts, each node's local rank 0 writes a heartbeat into
the shared run directory every `interval_s` (RUN_DIR/heartbeats/<host>.json: this allocation's
mark and a counter, replaced atomically), and every rank reads the other nodes' (an NFS client
revalidates a file it opens, so a new beat is seen at the next read). A node whose beat has not
changed for `timeout_s`, by the reader's own monotonic clock (no two nodes' clocks are
compared), is lost: the rank reports it (`on_lost`: a `node_lost` event) and ends with
exits.NODE_LOST; srun stops the ranks left and the job's requeue step requeues the job.

What cannot be told apart from a lost node: a shared filesystem that stops taking one node's
writes for `timeout_s` while the node trains on. The allocation then ends early and the job
resumes from its last checkpoint; nothing is lost but the steps since.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import exits, logs
from ..core.background import Background

log = logging.getLogger(__name__)


def interval_for(timeout_s: float) -> float:
    """Beats come six times within the timeout, at most every 10 s and at least every second."""
    return min(10.0, max(1.0, timeout_s / 6))


@dataclass(frozen=True)
class Lost:
    """What a rank saw when it gave a node up: the fields of a `node_lost` event."""

    host: str
    """The node that stopped beating."""
    silent_s: float
    """Seconds, by this rank's clock, since its beat last changed (or since watching began)."""
    timeout_s: float
    beats_seen: int
    """How many of its beats this rank saw change in this allocation (0: none at all)."""
    rank: int
    step: int

    def fields(self) -> dict[str, Any]:
        import socket

        return {"lost_host": self.host, "silent_s": round(self.silent_s, 1),
                "timeout_s": self.timeout_s, "beats_seen": self.beats_seen, "rank": self.rank,
                "step": self.step, "host": socket.gethostname(), "pid": os.getpid()}


class NodeHeartbeat(Background):
    """Start with `start()` once every rank has joined; `step` is read when a node is lost."""

    thread_name = "telepathy-heartbeat"

    def __init__(self, directory: Path, host: str, hosts: list[str], mark: str, beats: bool,
                 timeout_s: float, rank: int = 0,
                 on_lost: Callable[[Lost], None] = lambda lost: None,
                 step: Callable[[], int] = lambda: 0,
                 exit: Callable[[int], None] = os._exit,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.directory = directory
        self.host = host
        self.others = sorted(set(hosts) - {host})
        self.mark = mark
        """This allocation's mark (job id and launch): a beat from an earlier allocation on the
        same host is no beat."""
        self.beats = beats
        """Whether this rank writes its node's beat (local rank 0)."""
        self.timeout_s = timeout_s
        self.interval_s = interval_for(timeout_s)
        self.rank = rank
        self.on_lost = on_lost
        self.step = step
        self._exit = exit
        self.clock = clock
        self.count = 0
        self._seen: dict[str, tuple[Any, float, int]] = {}
        """host -> (its last beat read, when it changed by our clock, changes seen)."""
        self.lost: Lost | None = None

    def path(self, host: str) -> Path:
        return self.directory / f"{host}.json"

    def beat(self) -> None:
        """Write this node's next beat (atomically: a reader sees the old one or the new one)."""
        self.count += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(self.host)
        tmp = path.with_name(f".{path.name}.tmp")
        # No fsync: a beat has to be seen by the other nodes, not to outlive a crash.
        tmp.write_text(json.dumps({"host": self.host, "mark": self.mark, "beat": self.count,
                                   "pid": os.getpid(), "time": time.time()}))
        os.replace(tmp, path)

    def read(self, host: str) -> Any:
        """The host's beat of this allocation, or None (none yet, an earlier allocation's, or a
        file caught half written by a filesystem without atomic rename)."""
        try:
            beat = json.loads(self.path(host).read_bytes())
        except (OSError, ValueError):
            return None
        return beat.get("beat") if beat.get("mark") == self.mark else None

    def check(self) -> Lost | None:
        """One look at every other node; the first one silent past the timeout, or None."""
        now = self.clock()
        for host in self.others:
            beat = self.read(host)
            last, since, changes = self._seen.get(host, (None, now, 0))
            if beat is not None and beat != last:
                last, since, changes = beat, now, changes + 1
            self._seen[host] = (last, since, changes)
            if now - since > self.timeout_s:
                return Lost(host, now - since, self.timeout_s, changes, self.rank, self.step())
        return None

    def _run(self) -> None:
        polled = self.clock()
        while True:
            if self.beats:
                try:
                    self.beat()
                except OSError as exc:  # the next one may go through; readers wait timeout_s
                    log.warning("heartbeat: could not write %s: %s", self.path(self.host), exc)
            now = self.clock()
            if now - polled > max(5.0, 3 * self.interval_s):
                # This process lay stopped (SIGSTOP, scontrol suspend): the others' silence
                # meanwhile is not theirs. Count again from now.
                self._seen = {h: (v[0], now, v[2]) for h, v in self._seen.items()}
            polled = now
            lost = self.check()
            if lost is not None:
                self._fire(lost)
                return
            if self._stop.wait(self.interval_s):
                return

    def _fire(self, lost: Lost) -> None:
        self.lost = lost
        log.error("NODE LOST: no heartbeat from %s for %.0f s (train.node_timeout_s=%g; %d of its "
                  "beats seen in this allocation); rank %d leaves with %d at step %d so that the "
                  "job is requeued without waiting for a collective to time out", lost.host,
                  lost.silent_s, lost.timeout_s, lost.beats_seen, self.rank, exits.NODE_LOST,
                  lost.step)
        try:
            self.on_lost(lost)
        except Exception as exc:  # leaving matters more than the record
            log.error("could not record the lost node: %s", exc)
        logs.flush()
        self._exit(exits.NODE_LOST)
