"""The checkpoints/ directory of a run: which checkpoints exist, which are complete, and the one
way to delete and prune them (used by the trainer after every save and by
`telepathy checkpoint prune`).

Deleting a checkpoint removes its manifest first (then fsyncs), so a crash half-way leaves it
visibly incomplete, never complete and damaged.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.fsutil import fsync_dir, write_json_atomic
from ..core.paths import RunPaths, checkpoint_step
from ..testing.faults import FaultPlan
from .manifest import MANIFEST, STATE, parse_manifest

log = logging.getLogger(__name__)


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint directory; None when it is missing or damaged (a flipped
    byte can also make it invalid UTF-8)."""
    try:
        return parse_manifest((ckpt / MANIFEST).read_bytes().decode())
    except (OSError, ValueError):
        return None


def is_complete(ckpt: Path) -> bool:
    """The one definition: a manifest that exists, parses and matches its own checksum."""
    return read_manifest(ckpt) is not None


def candidates(checkpoints: Path) -> list[tuple[int, Path]]:
    """Checkpoint directories, newest first, complete or not."""
    if not checkpoints.is_dir():
        return []
    found = [(checkpoint_step(p.name), p) for p in checkpoints.iterdir() if p.is_dir()]
    return sorted(((s, p) for s, p in found if s is not None), reverse=True)


def complete_steps(checkpoints: Path) -> list[int]:
    """Steps of the complete checkpoints (not verified), oldest first."""
    return sorted(s for s, p in candidates(checkpoints) if is_complete(p))


def best_step(paths: RunPaths) -> int | None:
    """The step of the run's best checkpoint (checkpoint.keep_best: the lowest eval_loss), that
    is complete on disk: the one best.json names (written once the best was durable), else the
    newest best a complete checkpoint records that is itself complete; None when there is none.
    A record of a best that never became durable (a save that failed) is passed over."""
    complete = set(complete_steps(paths.checkpoints))
    named = [_best_in(paths.best)] + [_best_in(p / STATE)
                                      for s, p in candidates(paths.checkpoints) if s in complete]
    return next((step for step in named if step in complete), None)


def _best_in(path: Path) -> int | None:
    try:
        best = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    best = best.get("best", best) if isinstance(best, dict) else None
    return best.get("step") if isinstance(best, dict) else None


def record_best(paths: RunPaths, best: dict[str, Any]) -> None:
    """best.json: the best checkpoint, once it is durable."""
    write_json_atomic(paths.best, best)


def remove(ckpt: Path, faults: FaultPlan = FaultPlan(), rank: int = 0) -> None:
    """Delete a checkpoint so that a crash half-way leaves it visibly incomplete."""
    manifest = ckpt / MANIFEST
    if manifest.exists():
        manifest.unlink()
        fsync_dir(ckpt)
        faults.hit("prune.manifest_removed", checkpoint_step(ckpt.name) or -1, rank)
    shutil.rmtree(ckpt)


def prune(paths: RunPaths, keep: int, check: Callable[[Path], bool] | None = None,
          faults: FaultPlan = FaultPlan(), rank: int = 0) -> list[str]:
    """Keep the newest `keep` complete checkpoints (that also pass `check`, when given: the CLI
    verifies every file); delete the complete ones older than those, incomplete leftovers older
    than the newest complete one (they cannot be a save in progress), and the universal copies
    of checkpoints that are gone. Returns the names deleted, oldest first.

    Fewer than `keep` passing checkpoints: no complete checkpoint is deleted. A complete one that
    fails `check` but is newer than the oldest kept stays, for inspection, and so does one whose
    manifest exists but is damaged (resume moves it to rejected/). The best checkpoint (as the
    newest complete one records it: `best_step`) is kept beside the newest `keep`.
    """
    found = candidates(paths.checkpoints)
    complete = [(s, p) for s, p in found if is_complete(p)]
    if not complete:
        return []
    best = best_step(paths)
    kept = []
    for step, ckpt in complete:
        if len(kept) == keep:
            break
        if check is None or check(ckpt):
            kept.append(step)
    oldest_kept = kept[-1] if len(kept) == keep else -1
    newest = complete[0][0]
    leftovers = [p for s, p in found if not (p / MANIFEST).exists() and s < newest]
    doomed = [p for s, p in complete if s < oldest_kept and s != best] + leftovers
    for ckpt in sorted(doomed):
        remove(ckpt, faults, rank)
    if doomed:
        fsync_dir(paths.checkpoints)
        log.info("pruned checkpoints %s", ", ".join(sorted(p.name for p in doomed)))
    prune_universal(paths, {s for s, p in complete if p not in doomed})
    return sorted(p.name for p in doomed)


def prune_universal(paths: RunPaths, steps: set[int]) -> None:
    """Delete cached universal conversions whose checkpoint is gone, and temp leftovers."""
    root = paths.universal_root
    if not root.is_dir():
        return
    stale = [p for p in root.iterdir() if checkpoint_step(p.name) not in steps]
    for item in stale:
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    if stale:
        fsync_dir(root)


def set_aside(paths: RunPaths, rejected: list[dict[str, Any]], keep: int) -> None:
    """After a fallback: delete incomplete leftovers, move damaged checkpoints to rejected/.

    Damaged ones are kept (the newest `keep`) for inspection, never scanned again.
    """
    aside = paths.checkpoints / "rejected"
    for item in rejected:
        ckpt = paths.checkpoints / item["checkpoint"]
        if not ckpt.exists():
            continue
        if not (ckpt / MANIFEST).exists():
            shutil.rmtree(ckpt)
            continue
        aside.mkdir(exist_ok=True)
        ckpt.rename(aside / f"{ckpt.name}-{int(time.time())}")
    if aside.is_dir():
        for old in sorted(aside.iterdir(), key=lambda p: p.stat().st_mtime)[: -keep]:
            shutil.rmtree(old)
    if paths.checkpoints.is_dir():
        fsync_dir(paths.checkpoints)


@dataclass(frozen=True)
class Found:
    """A verified checkpoint: its directory, step, and telepathy state."""

    path: Path
    step: int
    state: dict[str, Any]
