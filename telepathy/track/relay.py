"""The relay: rank 0's child process that feeds the trackers from the run's files.

`python -m telepathy.track.relay RUN_DIR --restart N --resume-step R` (started by
`RelayProcess`): opens each tracker of `track:`, sends what earlier allocations trained and
evaluated and the tracker lacks (the last line of each step up to R, the step this allocation
resumed from, and of each evaluation), then follows metrics.jsonl, events.jsonl and
system-*.jsonl until its stdin closes (rank 0 is done, or died), sends what is left, closes the
tracker runs and exits. Each step and each evaluation reaches a tracker once: a high-water mark
per tracker for each (`hwm`, `eval_hwm`), kept in track/state.json. SLURM's signals are ignored:
rank 0 decides when the relay ends and how long it may take (`track.flush_s`).

A tracker that raises is dropped for the rest of the allocation with one warning and a
`tracker_failed` event; the next allocation's relay sends what it missed. Nothing here can
reach a training step: it is another process, and it only reads the files the step wrote.

`telepathy track sync RUN_DIR` runs the same catch-up once, for a run that is not running (a
tracker added later, or a relay cut off at the end of the last allocation).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..config import load_config
from ..config.schema import Config
from ..core import exits, logs
from ..core.eventlog import EventLog
from ..core.events import Event, Stamp, is_eval_row, is_train_row
from ..core.jsonl import JsonlWriter, evals_per_step, last_per_step
from ..core.paths import RunPaths
from . import records, state
from .sinks import SINKS, Context, Sink

log = logging.getLogger("telepathy.track")

FLUSH_EVERY_S = 2.0
FAULT_ENV = "TELEPATHY_TRACK_FAULT"
"""Test fault: the named tracker (e.g. `mlflow`) raises on every call, as a tracker on a full
disk or behind a dead network does. Unset in real runs."""


class Follower:
    """New complete lines of a JSON-lines file, from where the last call stopped."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        import json

        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                out.append(row)
        return out


class Faulty(Sink):
    """A sink whose every call raises (FAULT_ENV): a test fault, named as one."""

    def __init__(self, inner: Sink):
        self.name = inner.name
        self.exact_steps = inner.exact_steps

    def _raise(self, *args: Any) -> Any:
        raise OSError(f"injected tracker fault ({FAULT_ENV}={self.name})")

    open = held_evals = step = evaluation = extra = flush = _raise

    def close(self, finished: bool) -> None:
        self._raise()


def final_lines(rows: list[dict[str, Any]], restart: int, resume_step: int) -> list[dict[str, Any]]:
    """What earlier allocations left final: the last training line of each step up to the step
    this allocation resumed from, each followed by its step's last evaluation line."""
    final = [r for r in rows if r.get("restart", 0) < restart and r.get("step", 0) <= resume_step]
    return sorted([*last_per_step(final).values(), *evals_per_step(final).values()],
                  key=lambda r: (r["step"], is_eval_row(r)))


class SharedState:
    """track/state.json, shared by the relay's per-tracker threads (each writes its own entry)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.data = state.load(run_dir)
        self.lock = threading.Lock()

    def mine(self, names: list[str]) -> dict[str, Any]:
        """A private copy of these trackers' entries, for one thread to change."""
        with self.lock:
            return {n: copy.deepcopy(self.data.get(n, {})) for n in names}

    def save(self, entries: dict[str, Any]) -> None:
        """Write one thread's entries (copied by that thread) beside the others'."""
        with self.lock:
            self.data.update(copy.deepcopy(entries))
            try:
                state.save(self.run_dir, self.data)
            except OSError as exc:
                log.warning("could not write %s: %s", state.path_of(self.run_dir), exc)


class Relay:
    def __init__(self, run_dir: Path, cfg: Config, restart: int, resume_step: int,
                 job_id: str | None = None, world_size: int | None = None,
                 trackers: list[str] | None = None, shared: SharedState | None = None):
        self.paths = RunPaths.at(run_dir)
        self.cfg = cfg
        self.restart = restart
        self.resume_step = resume_step
        self.events_log = EventLog(JsonlWriter(self.paths.events), Stamp(restart, job_id,
                                                                         world_size))
        self.trackers = cfg.track.trackers if trackers is None else trackers
        self.shared = shared or SharedState(self.paths.root)
        self.state = self.shared.mine(self.trackers)
        self.sinks: dict[str, Sink] = {}
        self.hwm: dict[str, int] = {}
        """The last step each tracker holds."""
        self.eval_hwm: dict[str, int] = {}
        """The last evaluated step each tracker holds: no evaluation at or below it is sent."""
        self.evaluates = cfg.eval.enabled
        """Whether an evaluation line may follow a step's line (track/state.json's `eval_hwm`)."""
        self.cursor: dict[str, int] = {}
        """Lines of events.jsonl each sink was given."""
        self.metrics = Follower(self.paths.metrics)
        self.events = Follower(self.paths.events)
        self.system: dict[Path, Follower] = {}
        self.events_seen = 0
        self.current = resume_step
        self.finished = False

    # -- a tracker that fails is dropped ------------------------------------------------------------
    def _call(self, name: str, what: str, *args: Any) -> Any:
        sink = self.sinks.get(name)
        if sink is None:
            return None
        try:
            return getattr(sink, what)(*args)
        except Exception as exc:  # noqa: BLE001 (any tracker error: drop it, train on)
            log.warning("tracker %s failed (%s: %s: %s); dropped for the rest of this allocation, "
                        "the next one sends what it missed", name, what, type(exc).__name__, exc)
            self.sinks.pop(name, None)
            try:
                self.events_log.emit(Event.TRACKER_FAILED, tracker=name,
                                     error=f"{type(exc).__name__}: {exc}"[:500])
            except OSError:
                pass
            return None

    # -- start: open, then send what earlier allocations left unsent --------------------------------
    def open(self) -> None:
        fault = os.environ.get(FAULT_ENV, "")
        config = self.cfg.to_dict()
        for name in self.trackers:
            self._open_one(name, config, fault)
        if not self.sinks:
            return
        rows = self.metrics.read()
        catch_up = final_lines(rows, self.restart, self.resume_step)
        events = self.events.read()
        self.events_seen = len(events)
        for event in events:
            self._note_end(event)
        for name in list(self.sinks):
            sink = self.sinks[name]
            purge = getattr(sink, "purge_from", None)
            for row in catch_up:
                self._send(name, row)
            # Events: those it was not given yet; for TensorBoard also those its purge removed.
            for i, event in enumerate(events):
                step = records.event_step(event, self.resume_step)
                if i >= self.cursor.get(name, 0) or (purge is not None and step >= purge):
                    self._give_event(name, event, step)
            self.cursor[name] = len(events)
        self._live([r for r in rows if r.get("restart") == self.restart])
        self.flush()

    def _open_one(self, name: str, config: dict[str, Any], fault: str) -> None:
        """Open one tracker's run and learn how far it got (dropped if it raises)."""
        sink = SINKS[name]()
        self.sinks[name] = Faulty(sink) if name == fault else sink
        entry = self.state.setdefault(name, {})
        ctx = Context(self.paths.root, config, self.cfg.track, self.resume_step, entry,
                      persist=lambda: self.shared.save(self.state))
        hwm = self._call(name, "open", ctx)
        evals = self._call(name, "held_evals", ctx, hwm) if name in self.sinks else None
        if name not in self.sinks:
            return
        self.hwm[name], self.eval_hwm[name] = hwm, evals
        skipped = max(0, hwm - self.resume_step)
        self.cursor[name] = int(entry.get("events", 0))
        log.info("tracker %s: %s; it holds steps up to %d (evaluations up to %d), the run's "
                 "values are final up to step %d%s", name, sink.where(), hwm, evals,
                 self.resume_step,
                 f"; steps {self.resume_step + 1}-{hwm} are trained again and keep the values "
                 "it holds (an exact resume gives the same losses; only step times differ, "
                 "and after a world-size change the losses by rounding)" if skipped else "")
        self.events_log.emit(Event.TRACKING, tracker=name, where=sink.where(), hwm=hwm,
                             eval_hwm=evals, resume_step=self.resume_step, skipped=skipped)
        entry["where"] = sink.where()

    def _note_end(self, event: dict[str, Any]) -> None:
        """Whether the run has finished: its newest launch, preemption or finish says."""
        if event.get("event") in (Event.FINISHED, Event.LAUNCH, Event.PREEMPTED, Event.ERROR):
            self.finished = event.get("event") == Event.FINISHED

    def _give_event(self, name: str, event: dict[str, Any], step: int) -> None:
        note = records.note(event)
        scalars = records.save_scalars(event)
        if note or scalars:
            self._call(name, "extra", step, scalars, [note] if note else [])

    # -- follow ---------------------------------------------------------------------------------
    def pump(self) -> None:
        """Send every complete line written since the last call."""
        self._live(self.metrics.read())
        new = self.events.read()
        for event in new:
            self._note_end(event)
            step = records.event_step(event, self.current)
            for name in list(self.sinks):
                self._give_event(name, event, step)
        self.events_seen += len(new)
        for name in self.cursor:
            self.cursor[name] = self.events_seen
        self._system()

    def _live(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row.get("restart") != self.restart or "step" not in row:
                continue
            self.current = row["step"]
            for name in list(self.sinks):
                self._send(name, row)

    def _send(self, name: str, row: dict[str, Any]) -> None:
        """A metrics line to one tracker, unless it holds it: a step's training scalars, or an
        evaluation's scalars at the step it evaluated."""
        step = int(row["step"])
        if is_eval_row(row):
            if step > self.eval_hwm[name]:
                self._call(name, "evaluation", step, records.eval_scalars(row))
            self.eval_hwm[name] = max(self.eval_hwm[name], step)
        elif is_train_row(row):
            if step > self.hwm[name]:
                self._call(name, "step", step, records.step_scalars(row), [])
                self.hwm[name] = step

    def _settled(self, name: str) -> int:
        """The step up to which a tracker was sent every evaluation there is: every evaluation of
        an earlier step came before its newest step's line; that step's own may still follow."""
        return max(self.eval_hwm[name], self.hwm[name] - 1 if self.evaluates else self.hwm[name])

    def _system(self) -> None:
        for path in self.paths.root.glob("system-*.jsonl"):
            follower = self.system.get(path)
            if follower is None:
                follower = self.system[path] = Follower(path)
                follower.offset = path.stat().st_size  # this allocation's samples on
            for sample in follower.read():
                scalars = records.system_scalars(sample)
                for name in list(self.sinks):
                    if scalars:
                        self._call(name, "extra", self.current, scalars, [])

    def flush(self) -> None:
        for name in list(self.sinks):
            self._call(name, "flush")
            if name in self.sinks:
                entry = self.state.setdefault(name, {})
                entry["hwm"] = self.hwm[name]
                entry["eval_hwm"] = self._settled(name)  # where TensorBoard's purge may start
                entry["events"] = self.cursor.get(name, 0)
        self.shared.save(self.state)

    def close(self) -> None:
        self.pump()
        self.flush()
        for name in list(self.sinks):
            self._call(name, "close", self.finished)
        self.shared.save(self.state)
        self.events_log.close()


def follow(relay: Relay, done: threading.Event) -> None:
    try:
        relay.open()
        last_flush = time.monotonic()
        while not done.wait(0.5):
            relay.pump()
            if time.monotonic() - last_flush >= FLUSH_EVERY_S:
                relay.flush()
                last_flush = time.monotonic()
        relay.close()
    except Exception as exc:  # noqa: BLE001 (the relay's own failure, e.g. a full disk)
        log.warning("tracker relay %s stopped: %s: %s; the next allocation (or `telepathy track "
                    "sync`) sends the rest", ",".join(relay.trackers), type(exc).__name__, exc)
        for name in list(relay.sinks):
            relay._call(name, "close", relay.finished)


def _wait_for_eof(done: threading.Event, deadline_s: float) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    done.set()
    # Rank 0 gone (or done): finish within the deadline whatever a tracker waits on. Rank 0
    # kills the relay itself after track.flush_s; this covers a rank 0 that died without it.
    timer = threading.Timer(deadline_s, lambda: os._exit(exits.HUNG))
    timer.daemon = True
    timer.start()


def _preimport(trackers: list[str]) -> None:
    """Import the trackers' packages one after another before their threads start (three
    threads importing torch, wandb and mlflow at once can meet in an import lock)."""
    modules = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb",
               "mlflow": "mlflow.entities"}
    for name in trackers:
        try:
            __import__(modules[name])
        except Exception:  # noqa: BLE001 (its thread fails on it, with a tracker_failed event)
            pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m telepathy.track.relay", description=__doc__)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--restart", type=int, required=True)
    p.add_argument("--resume-step", type=int, required=True)
    p.add_argument("--job-id")
    p.add_argument("--world-size", type=int)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # rank 0 ends the relay, by closing its stdin
    args = parse_args(argv)
    logs.configure(0)
    cfg = load_config(RunPaths.at(args.run_dir).config)
    _preimport(cfg.track.trackers)
    done = threading.Event()
    threading.Thread(target=_wait_for_eof, args=(done, cfg.track.flush_s + 30), daemon=True).start()
    # A thread per tracker: one that blocks (W&B online without a network waits in init) holds
    # up none of the others; rank 0 ends the process after track.flush_s whatever it waits on.
    shared = SharedState(RunPaths.at(args.run_dir).root)
    threads = [threading.Thread(target=follow, name=f"relay-{name}", daemon=True,
                                args=(Relay(args.run_dir, cfg, args.restart, args.resume_step,
                                            args.job_id, args.world_size, [name], shared), done))
               for name in cfg.track.trackers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
