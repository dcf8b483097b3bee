"""`telepathy checkpoint` (`python -m telepathy.checkpoint`): inspect, verify and prune a run's
checkpoints.

    telepathy checkpoint list   RUN_DIR          # fast: manifests only, no hashing
    telepathy checkpoint verify RUN_DIR          # every file against its manifest
    telepathy checkpoint prune  RUN_DIR --keep K # keep the newest K that verify
    telepathy checkpoint list   s3://bucket/run  # a mirror (checkpoint.mirror): the same
    telepathy checkpoint verify s3://bucket/run  # every object read back against its manifest

Table: step (marked `(best)` for the best checkpoint of checkpoint.keep_best), status (valid,
corrupt, incomplete; `list` says complete), size, files, world size, age. `--json` prints the
rows. Exit status: 0 the newest checkpoint is valid (complete, for list), 1 it is not, 2 no
checkpoint or bad input. `prune` refuses while a live job holds the run (its saves would race
the deletion) unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..core.errors import ConfigError, RunLocked
from ..core.exits import BAD_INPUT, OK
from ..core.exits import FAILED as NOT_VALID
from ..core.paths import RunPaths, checkpoint_step
from ..core.runlock import RunLock
from . import directory
from .directory import read_manifest
from .hashing import verify_all
from .manifest import MANIFEST


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="telepathy checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["list", "verify", "prune"])
    p.add_argument("run_dir", help="a run directory (or its checkpoints/ directory), or a "
                   "mirror's URL (checkpoint.mirror; list and verify)")
    p.add_argument("--keep", type=int, help="prune: complete checkpoints to keep (>= 1)")
    p.add_argument("--force", action="store_true", help="prune even while a job holds the run")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def run_paths(arg: str) -> RunPaths:
    path = Path(arg)
    if path.name == "checkpoints" and not (path / "checkpoints").is_dir():
        path = path.parent
    return RunPaths.at(path)


def describe(ckpt: Path, check: bool, now: float) -> dict[str, Any]:
    """One row: status and facts of a checkpoint directory (hashing every file when `check`)."""
    manifest = read_manifest(ckpt)
    row: dict[str, Any] = {"checkpoint": ckpt.name, "step": checkpoint_step(ckpt.name),
                           "path": str(ckpt)}
    if manifest is None:
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        why = "MANIFEST.json damaged" if (ckpt / MANIFEST).exists() else "no manifest"
        return {**row, "status": "corrupt" if (ckpt / MANIFEST).exists() else "incomplete",
                "bytes": size, "files": None, "world_size": None,
                "age_s": now - ckpt.stat().st_mtime, "problems": [why]}
    row.update(bytes=manifest.get("bytes"), files=len(manifest["files"]),
               world_size=manifest.get("world_size"), age_s=now - manifest.get("created", now))
    if not check:
        return {**row, "status": "complete", "problems": []}
    started = time.perf_counter()
    problems = verify_all(ckpt, manifest)
    return {**row, "status": "corrupt" if problems else "valid", "problems": problems,
            "verify_s": round(time.perf_counter() - started, 3)}


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _age(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def table(rows: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title)
    for col in ("step", "status", "size", "files", "world", "age"):
        t.add_column(col, justify="right")
    colour = {"valid": "green", "complete": "green", "corrupt": "red", "incomplete": "yellow"}
    for r in rows:
        t.add_row(f"{r['step']}{' (best)' if r.get('best') else ''}",
                  f"[{colour[r['status']]}]{r['status']}[/]", _size(r["bytes"]),
                  str(r["files"] or "-"), str(r["world_size"] or "-"), _age(r["age_s"]))
    return t


def prune(paths: RunPaths, keep: int, force: bool) -> list[str]:
    """Keep the newest `keep` checkpoints that verify (the trainer's prune, with every file
    verified); refuses while a live job holds the run, unless `force`."""
    lock: RunLock | None = RunLock(paths.lock, None)
    try:
        lock.acquire()
    except RunLocked as exc:
        if not force:
            raise
        print(f"warning: {exc}; pruning anyway (--force)", file=sys.stderr)
        lock = None
    try:
        return directory.prune(paths, keep, check=lambda ckpt: not verify_all(ckpt, read_manifest(ckpt)))
    finally:
        if lock is not None:
            lock.release()


def mirror_rows(url: str, check: bool, now: float) -> list[dict[str, Any]]:
    """The rows of a mirror's checkpoints, newest first (reading every object back when
    `check`)."""
    from . import mirror

    store = mirror.open_store(url)
    rows = []
    for step, name in store.names():
        manifest = store.manifest(name)
        row: dict[str, Any] = {"checkpoint": name, "step": step, "path": store.path(name)}
        if manifest is None:
            rows.append({**row, "status": "incomplete", "bytes": None, "files": None,
                         "world_size": None, "age_s": 0.0,
                         "problems": ["no manifest (incomplete, or found damaged at a fetch)"]})
            continue
        row.update(bytes=manifest.get("bytes"), files=len(manifest["files"]),
                   world_size=manifest.get("world_size"),
                   age_s=now - manifest.get("created", now))
        if not check:
            rows.append({**row, "status": "complete", "problems": []})
            continue
        started = time.perf_counter()
        problems = mirror.verify(store, name, manifest)
        rows.append({**row, "status": "corrupt" if problems else "valid", "problems": problems,
                     "verify_s": round(time.perf_counter() - started, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    from .mirror import is_url
    if is_url(args.run_dir):
        if args.command == "prune":
            print("error: prune works on a run directory; a mirror is pruned by its run "
                  "(checkpoint.mirror_keep)", file=sys.stderr)
            return BAD_INPUT
        try:
            rows = mirror_rows(args.run_dir, args.command == "verify", time.time())
        except (ConfigError, OSError) as exc:
            print(f"error: {args.run_dir}: {exc}", file=sys.stderr)
            return BAD_INPUT
        return show(rows, f"{args.run_dir} ({args.command})", args.json, console)
    paths = run_paths(args.run_dir)
    if not paths.checkpoints.is_dir():
        print(f"error: {paths.checkpoints} does not exist; give a run directory "
              "(the --run-dir of telepathy.resume)", file=sys.stderr)
        return BAD_INPUT
    if args.command == "prune":
        if args.keep is None or args.keep < 1:
            print(f"error: --keep={args.keep}: give the number of complete checkpoints to keep "
                  "(at least 1)", file=sys.stderr)
            return BAD_INPUT
        try:
            removed = prune(paths, args.keep, args.force)
        except RunLocked as exc:
            print(f"error: {exc}; or pass --force", file=sys.stderr)
            return BAD_INPUT
        print(json.dumps({"removed": removed}) if args.json else
              f"removed {len(removed)} checkpoint(s): {', '.join(removed) or '-'}")
        return OK
    now = time.time()
    dirs = sorted((p for p in paths.checkpoints.iterdir()
                   if p.is_dir() and checkpoint_step(p.name) is not None), reverse=True)
    best = directory.best_step(paths)
    rows = [{**describe(p, args.command == "verify", now),
             "best": checkpoint_step(p.name) == best} for p in dirs]
    return show(rows, f"{paths.checkpoints} ({args.command})", args.json, console)


def show(rows: list[dict[str, Any]], title: str, as_json: bool, console: Console) -> int:
    """Print the rows; the exit status of the newest."""
    if as_json:
        print(json.dumps(rows, indent=1))
    else:
        console.print(table(rows, title))
        for r in rows:
            for problem in r["problems"]:
                console.print(f"{r['checkpoint']}: {problem}", markup=False)
    if not rows:
        return BAD_INPUT
    return OK if rows[0]["status"] in ("valid", "complete") else NOT_VALID
