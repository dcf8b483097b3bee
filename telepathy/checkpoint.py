"""The checkpoint manager: one directory per step, valid only once its manifest exists.

Save (collective, every rank):
  1. DeepSpeed writes its ZeRO-3 shards into checkpoints/step_XXXXXXXX/ (save_latest=False),
  2. every rank writes its RNG state (safetensors), rank 0 writes state.json,
  3. the files are fsynced and hashed, split across ranks,
  4. rank 0 writes MANIFEST.json last (temp, fsync, rename, fsync dir), then prunes.
Resume verifies every file against the manifest (split across ranks) before DeepSpeed
unpickles anything, and falls back to the previous checkpoint when one fails.
Nothing here trusts DeepSpeed's `latest` file.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from . import rng
from .distributed import Dist
from .faults import FaultPlan
from .health import fits
from .fsutil import fsync_dir, sha256_file, write_json_atomic
from .paths import MANIFEST, RunPaths, checkpoint_name, checkpoint_step

log = logging.getLogger(__name__)

FORMAT = "telepathy-checkpoint/1"
STATE = "telepathy/state.json"
HASH_THREADS = 4


def rank_state_file(rank: int) -> str:
    return f"telepathy/rank_{rank:05d}.safetensors"


@dataclass(frozen=True)
class Found:
    """A verified checkpoint: its directory, step, and telepathy state."""

    path: Path
    step: int
    state: dict[str, Any]


def _problems(ckpt: Path, manifest: dict[str, Any], names: list[str]) -> list[str]:
    """Verify the files `names` of a checkpoint against its manifest."""
    def check(name: str) -> str | None:
        entry = manifest["files"].get(name)
        path = ckpt / name
        if entry is None:
            return f"{name}: not listed in the manifest (stray file)"
        if not path.is_file():
            return f"{name}: missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name}: size {size} bytes, manifest says {entry['size']}"
        _, digest = sha256_file(path)
        if digest != entry["sha256"]:
            return f"{name}: sha256 {digest}, manifest says {entry['sha256']}"
        return None

    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return [p for p in pool.map(check, names) if p]


def list_files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}"))


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    return manifest


class CheckpointManager:
    def __init__(self, paths: RunPaths, dist: Dist, keep: int, faults: FaultPlan = FaultPlan(),
                 estimate_bytes: int = 0):
        self.paths = paths
        self.dist = dist
        self.keep = keep
        self.faults = faults
        self.estimate_bytes = estimate_bytes
        """Expected size of a checkpoint before the first one exists."""

    def space(self) -> tuple[bool, int, int]:
        """Collective: (fits, free bytes, needed bytes) for the next checkpoint, rank 0's view."""
        verdict = None
        if self.dist.is_main:
            complete = [p for _, p in self.candidates() if (p / MANIFEST).exists()]
            manifest = read_manifest(complete[0]) if complete else None
            needed = manifest["bytes"] if manifest else self.estimate_bytes
            free = shutil.disk_usage(self.paths.root).free
            verdict = (fits(free, needed), free, needed)
        return self.dist.broadcast_object(verdict)

    # -- save ------------------------------------------------------------------------------
    def save(self, engine: Any, step: int, state: dict[str, Any]) -> dict[str, Any]:
        """Write a complete checkpoint of `step` on every rank. Returns size and timing."""
        started = time.time()
        name = checkpoint_name(step)
        ckpt = self.paths.checkpoint(step)
        hit = lambda point: self.faults.hit(point, step, self.dist.rank)  # noqa: E731
        if self.dist.is_main:
            self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
            if ckpt.exists():  # a leftover of a save that never completed
                self._remove(ckpt)
        self.dist.barrier()
        hit("save.start")
        engine.save_checkpoint(str(self.paths.checkpoints), tag=name, client_state={},
                               save_latest=False)
        engine_done = time.time()
        hit("save.engine_done")
        (ckpt / "telepathy").mkdir(parents=True, exist_ok=True)
        tensors, meta = rng.capture()
        save_file(tensors, str(ckpt / rank_state_file(self.dist.rank)),
                  metadata={"rng": json.dumps(meta)})
        if self.dist.is_main:
            (ckpt / STATE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        hit("save.state_done")
        self.dist.barrier()

        files = self.dist.broadcast_object(list_files(ckpt) if self.dist.is_main else None)
        mine = files[self.dist.rank::self.dist.world_size]
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            hashed = dict(zip(mine, pool.map(lambda n: sha256_file(ckpt / n, fsync=True), mine)))
        entries: dict[str, dict[str, Any]] = {}
        for part in self.dist.all_gather_object(hashed):
            entries.update({n: {"size": s, "sha256": h} for n, (s, h) in part.items()})
        hashed_at = time.time()
        hit("save.hashed")
        total = sum(e["size"] for e in entries.values())
        if self.dist.is_main:
            for sub in {(ckpt / n).parent for n in files}:
                fsync_dir(sub)
            manifest = {"format": FORMAT, "step": step, "world_size": self.dist.world_size,
                        "created": time.time(), "bytes": total, "files": entries}
            write_json_atomic(ckpt / MANIFEST, manifest,
                              before_replace=lambda: hit("save.manifest_tmp"))
            fsync_dir(self.paths.checkpoints)
            hit("save.done")
            self.prune()
        self.dist.barrier()
        done = time.time()
        return {"bytes": total, "files": len(entries), "seconds": round(done - started, 3),
                "engine_s": round(engine_done - started, 3),
                "fsync_hash_s": round(hashed_at - engine_done, 3),
                "manifest_prune_s": round(done - hashed_at, 3)}

    # -- find and load ---------------------------------------------------------------------
    def candidates(self) -> list[tuple[int, Path]]:
        """Checkpoint directories, newest first (whether complete or not)."""
        root = self.paths.checkpoints
        if not root.is_dir():
            return []
        found = [(checkpoint_step(p.name), p) for p in root.iterdir() if p.is_dir()]
        return sorted(((s, p) for s, p in found if s is not None), reverse=True)

    def newest_valid(self) -> tuple[Found | None, list[dict[str, Any]]]:
        """Collective: the newest checkpoint whose every file matches its manifest.

        Returns it (or None) and a list of rejected checkpoints with their problems.
        """
        rejected: list[dict[str, Any]] = []
        for step, ckpt in self.candidates():
            manifest = read_manifest(ckpt)
            if manifest is None:
                rejected.append({"checkpoint": ckpt.name, "problems": ["no manifest (incomplete)"]})
                continue
            files = sorted(set(manifest["files"]) | set(list_files(ckpt)))
            mine = files[self.dist.rank::self.dist.world_size]
            problems = [p for part in self.dist.all_gather_object(_problems(ckpt, manifest, mine))
                        for p in part]
            if problems:
                rejected.append({"checkpoint": ckpt.name, "problems": problems})
                continue
            state = json.loads((ckpt / STATE).read_text())
            return Found(ckpt, step, state), rejected
        return None, rejected

    def load(self, engine: Any, found: Found, universal: Path | None = None,
             train_seed: int = 0) -> None:
        """Load a verified checkpoint into the engine and restore this rank's RNG state.

        `universal`: its verified universal copy, when the world size changed (see elastic.py);
        a rank that did not exist then gets a fresh RNG seeded from (train_seed, step, rank).
        """
        source = universal or found.path
        load_path, _ = engine.load_checkpoint(str(source.parent), tag=source.name,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {source}")
        if universal is not None:
            from .elastic import repair_universal_load, rng_seed
            repaired = repair_universal_load(engine, universal)
            if repaired:
                log.info("after DeepSpeed's universal load, repaired: %s", "; ".join(repaired))
            if self.dist.rank >= found.state["world_size"]:
                rng.seed_all(rng_seed(train_seed, found.step, self.dist.rank))
                return
        path = str(found.path / rank_state_file(self.dist.rank))
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads(f.metadata()["rng"])
        rng.restore(tensors, meta)

    # -- housekeeping (rank 0) -------------------------------------------------------------
    def set_aside(self, rejected: list[dict[str, Any]]) -> None:
        """After a fallback: delete incomplete leftovers, move corrupt checkpoints to rejected/.

        Rank 0 only. Corrupt ones are kept (the newest `keep`) for inspection, never scanned again.
        """
        aside = self.paths.checkpoints / "rejected"
        for item in rejected:
            ckpt = self.paths.checkpoints / item["checkpoint"]
            if not ckpt.exists():
                continue
            if not (ckpt / MANIFEST).exists():
                shutil.rmtree(ckpt)
                continue
            aside.mkdir(exist_ok=True)
            ckpt.rename(aside / f"{ckpt.name}-{int(time.time())}")
        if aside.is_dir():
            for old in sorted(aside.iterdir(), key=lambda p: p.stat().st_mtime)[: -self.keep]:
                shutil.rmtree(old)
        fsync_dir(self.paths.checkpoints) if self.paths.checkpoints.is_dir() else None

    def _remove(self, ckpt: Path) -> None:
        """Delete a checkpoint so that a crash half-way leaves it visibly incomplete."""
        manifest = ckpt / MANIFEST
        if manifest.exists():
            manifest.unlink()
            fsync_dir(ckpt)
            self.faults.hit("prune.manifest_removed", checkpoint_step(ckpt.name) or -1,
                            self.dist.rank)
        shutil.rmtree(ckpt)

    def prune(self) -> list[str]:
        """Keep the newest `keep` complete checkpoints; drop older ones and stale leftovers.

        A checkpoint is only deleted once `keep` newer complete ones exist, and an incomplete
        directory only when a newer complete one exists (it cannot be a save in progress).
        """
        complete = [(s, p) for s, p in self.candidates() if (p / MANIFEST).exists()]
        if not complete:
            return []
        kept = complete[: self.keep]
        oldest_kept = kept[-1][0]
        newest = complete[0][0]
        removed = []
        for step, ckpt in self.candidates():
            stale_complete = (step, ckpt) in complete and step < oldest_kept
            stale_partial = (step, ckpt) not in complete and step < newest
            if stale_complete or stale_partial:
                self._remove(ckpt)
                removed.append(ckpt.name)
        if removed:
            fsync_dir(self.paths.checkpoints)
            log.info("pruned checkpoints %s", ", ".join(removed))
        self._prune_universal({s for s, p in self.candidates() if (p / MANIFEST).exists()})
        return removed

    def _prune_universal(self, steps: set[int]) -> None:
        """Delete cached universal conversions whose checkpoint is gone, and temp leftovers."""
        root = self.paths.universal_root
        if not root.is_dir():
            return
        stale = [p for p in root.iterdir() if checkpoint_step(p.name) not in steps]
        for item in stale:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
        if stale:
            fsync_dir(root)
