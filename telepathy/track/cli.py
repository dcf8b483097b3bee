"""`telepathy track sync RUN_DIR [--set track.KEY=VALUE ...]`: send a run's steps to its
trackers once, for a run that is not running: a tracker turned on after the run, or a relay cut
off at the end of the last allocation. The same catch-up as an allocation's relay: each step
once, in the tracker run the run directory already has (or a new one)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import load_config
from ..core import exits, logs
from ..core.errors import ConfigError, RunLocked
from ..core.events import Event, of_kind
from ..core.jsonl import read_jsonl
from ..core.paths import RunPaths
from ..core.runlock import RunLock
from .relay import Relay

log = logging.getLogger("telepathy.track")


def durable_step(events: list[dict]) -> int:
    """The last step whose values are final: the end of a finished run, else the newest saved
    checkpoint (steps past it are trained again when the run resumes)."""
    finished = of_kind(events, Event.FINISHED)
    if finished:
        return int(finished[-1]["step"])
    saved = [e["step"] for e in of_kind(events, Event.CHECKPOINT_SAVED)]
    return max(saved, default=0)


def sync(run_dir: Path, overrides: list[str]) -> int:
    paths = RunPaths.at(run_dir)
    if not paths.config.is_file():
        print(f"{run_dir} has no config.yaml: not a telepathy run directory (or it never "
              "started)", file=sys.stderr)
        return exits.BAD_INPUT
    try:
        cfg = load_config(paths.config, [f"track.{o}" if not o.startswith("track.") else o
                                         for o in overrides])
    except ConfigError as exc:
        print(f"telepathy track sync: {exc}", file=sys.stderr)
        return exits.BAD_INPUT
    if not cfg.track.enabled:
        print(f"no tracker is on in {paths.config}; name one, e.g. --set tensorboard=true",
              file=sys.stderr)
        return exits.BAD_INPUT
    try:
        with RunLock(paths.lock, "telepathy track sync"):
            events = list(read_jsonl(paths.events))
            restarts = [r.get("restart", 0) for r in read_jsonl(paths.metrics)]
            relay = Relay(paths.root, cfg, restart=max(restarts, default=-1) + 1,
                          resume_step=durable_step(events))
            relay.open()
            relay.close()
    except RunLocked as exc:
        print(f"telepathy track sync: {exc}", file=sys.stderr)
        return exits.BAD_INPUT
    for name, entry in relay.state.items():
        if name in cfg.track.trackers:
            print(f"{name:<12} steps up to {entry.get('hwm', 0)}: {entry.get('where', '-')}")
    return exits.OK


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="telepathy track", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sync", help="send a stopped run's steps to its trackers")
    s.add_argument("run_dir", type=Path)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="turn a tracker on or change it for this sync (track.KEY=VALUE, e.g. "
                        "--set mlflow.enabled=true); the run's config.yaml is not changed")
    args = p.parse_args(argv)
    logs.configure(0)
    return sync(args.run_dir, args.set)


if __name__ == "__main__":
    sys.exit(main())
