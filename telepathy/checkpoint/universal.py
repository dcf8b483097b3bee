"""Resume at another world size: convert a ZeRO-3 checkpoint to DeepSpeed's universal format once,
verify it like any checkpoint, cache it in the run directory, and load it.

ZeRO-3 shards optimizer state by rank, so a checkpoint written by 2 ranks cannot be loaded by 1
or 4 as it is. DeepSpeed's `ds_to_universal` rewrites it per parameter (fp32 weights, both Adam
moments, step), and `"checkpoint": {"load_universal": true}` loads that at any world size.

The cache `universal/step_XXXXXXXX/` carries its own MANIFEST.json (sizes and SHA-256 of every
file, written last) and the SHA-256 of the source checkpoint's manifest, so a cache that is
incomplete, damaged, or made from another checkpoint of the same step is rebuilt, never trusted.

Remapping rule (world size W_old -> W_new):
- data: the position is the number of samples seen, and each step's samples are split over ranks
  by `data.rank_slice`, so the data order does not depend on the world size at all;
- RNG: rank r restores the saved RNG state of rank r when r < W_old; ranks r >= W_old are seeded
  from (train.seed, step, r) (`rng.new_rank_seed`). Only randomness inside the model (dropout)
  draws from these streams.

Two defects of DeepSpeed's universal load are repaired after loading, in
`telepathy.engine.adapter.repair_universal_load`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..core import proc
from ..core.errors import CheckpointError
from ..core.fsutil import fsync_dir, write_json_atomic
from ..core.paths import RunPaths
from ..engine import adapter
from .directory import Found, read_manifest
from .hashing import DEFAULT_HASH, Collective, hash_file, hash_threads, list_files, verify_across
from .manifest import FORMAT, MANIFEST, seal

log = logging.getLogger(__name__)

CONVERT_TIMEOUT_S = 6 * 3600


def source_id(ckpt: Path) -> str:
    """The SHA-256 of a checkpoint's manifest: names its exact contents."""
    return hashlib.sha256((ckpt / MANIFEST).read_bytes()).hexdigest()


def _cache_matches(target: Path, found: Found) -> bool:
    manifest = read_manifest(target)
    return (manifest is not None and manifest.get("kind") == "universal"
            and manifest.get("source_manifest_sha256") == source_id(found.path))


def _convert(found: Found, target: Path, workers: int) -> dict[str, Any]:
    """Rank 0: run ds_to_universal into a temp directory, hash it, write its manifest, rename."""
    tmp = target.with_name(f".{target.name}.tmp")
    for leftover in (tmp, target):
        if leftover.exists():
            shutil.rmtree(leftover)
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        proc.run(adapter.universal_command(found.path, tmp, workers), timeout=CONVERT_TIMEOUT_S)
    except proc.CommandError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"converting checkpoint {found.path.name} for a new world size failed: {exc}. "
            f"Free disk space if that was the cause, or resume with the original world size "
            f"({found.state['world_size']} GPU(s))") from None
    finally:
        (target.parent / adapter.LATEST_UNIVERSAL).unlink(missing_ok=True)  # never trusted
    converted = time.time()
    files = list_files(tmp)
    algorithm = read_manifest(found.path).get("hash", DEFAULT_HASH)  # the source's
    with ThreadPoolExecutor(hash_threads()) as pool:
        entries = dict(zip(files, pool.map(
            lambda n: hash_file(tmp / n, fsync=True, algorithm=algorithm), files)))
    for sub in {(tmp / n).parent for n in files}:
        fsync_dir(sub)
    manifest = {"format": FORMAT, "kind": "universal", "hash": algorithm, "step": found.step,
                "source": found.path.name, "source_manifest_sha256": source_id(found.path),
                "source_world_size": found.state["world_size"], "created": time.time(),
                "bytes": sum(e["size"] for e in entries.values()), "files": entries}
    write_json_atomic(tmp / MANIFEST, seal(manifest))
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return {"convert_s": round(converted - started, 3), "hash_s": round(time.time() - converted, 3),
            "bytes": manifest["bytes"]}


def _verify(target: Path, dist: Collective) -> list[str]:
    """Collective: every file of a universal copy against its manifest, split across ranks."""
    manifest = read_manifest(target)
    if manifest is None:
        return [f"{target.name}: no manifest"]
    return verify_across(target, manifest, dist)


def universal_checkpoint(found: Found, paths: RunPaths, dist: Any, workers: int = 2
                         ) -> tuple[Path, dict[str, Any]]:
    """Collective: a verified universal copy of `found`, taken from the cache or converted.

    Returns its directory and what was done: cached (with verify_s) or converted (convert_s,
    hash_s, bytes), and the problems of a cached copy that was rebuilt.
    """
    target = paths.universal(found.step)
    started = time.time()
    cached = dist.broadcast_object(target.is_dir() and _cache_matches(target, found)
                                   if dist.is_main else None)
    result: dict[str, Any] = {"cached": bool(cached)}
    if cached:
        problems = _verify(target, dist)
        if not problems:
            return target, {**result, "verify_s": round(time.time() - started, 3)}
        log.warning("the cached universal copy of %s is damaged (%s); converting again",
                    found.path.name, "; ".join(problems[:3]))
        result = {"cached": False, "rebuilt_after": problems[:10]}
    done: Any = None
    if dist.is_main:
        try:
            done = _convert(found, target, workers)
        except CheckpointError as exc:
            done = {"error": str(exc)}
    done = dist.broadcast_object(done)
    if "error" in done:
        raise CheckpointError(done["error"])
    # Its manifest was just made from the fsynced files; reading them back again would add
    # nothing but time. Every later use of the cached copy verifies it in full.
    return target, {**result, **done}
