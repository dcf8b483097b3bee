"""The checkpoint manager: one directory per step, valid only once its manifest exists.

Save (collective, every rank), in two parts:
  1. snapshot (blocks training): DeepSpeed's walk over its ZeRO-3 state, without the collectives
     its save_checkpoint wraps it in (adapter.save_checkpoint), hands each file's state to
     telepathy's checkpoint engine, which copies it to host memory; each rank's RNG state
     (safetensors) and, on rank 0, state.json are added;
  2. persist (a background thread per rank, training goes on): the files are serialised, hashed
     in the same pass and fsynced, several at once; the ranks exchange their file lists over a
     separate gloo group; rank 0 writes MANIFEST.json last (temp, fsync, rename, fsync dir) and
     prunes. At most one save is in flight: the next one, a preemption and the end of the run
     wait for it. A save that fails (disk full) is reported, its directory removed, and the
     previous checkpoint stays the newest.
A synchronous save (a preemption's, the last, or checkpoint.async_save off) skips the snapshot
copy: host tensors are written from where they are while training waits anyway.
Resume verifies every file against the manifest (chunks split across threads and ranks, each rank
taking the files it will load) before DeepSpeed unpickles anything, and falls back to the previous
checkpoint when one fails. A rank's own torch files are read only once: into memory while they are
verified, and deserialised from there (reader.py).
Nothing here trusts DeepSpeed's `latest` file. DeepSpeed itself is reached only through
`telepathy.engine.adapter` (the checkpoint-engine hook, the universal-load repairs).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch.distributed
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ..core.events import SaveResult
from ..core.fsutil import fsync_dir, write_json_atomic
from ..core.paths import RunPaths, checkpoint_name
from ..engine import adapter
from ..testing.faults import FaultPlan
from . import directory, rng
from .directory import Found, read_manifest
from .hashing import DEFAULT_HASH, owner, split_units, units_of, verify
from .manifest import FORMAT, MANIFEST, STATE, rank_state_file, seal
from .reader import NotAZip, VerifiedFile, read_verified
from .writer import PinnedPool, Writer

log = logging.getLogger(__name__)


class Collective(Protocol):
    """The collectives a save and a load need (telepathy.engine.distributed.Dist has them)."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def broadcast_object(self, obj: Any) -> Any: ...


def fits(free_bytes: int, needed_bytes: int, margin: float = 1.1) -> bool:
    """Whether a checkpoint of `needed_bytes` fits in `free_bytes`, with a safety margin."""
    return free_bytes >= needed_bytes * margin


PRELOAD_RESERVE_BYTES = 2 * 2**30
"""Host memory left free when a rank keeps its verified files in memory until the load."""


def _available_memory() -> int:
    import psutil
    return psutil.virtual_memory().available


class CheckpointManager:
    def __init__(self, paths: RunPaths, dist: Collective, keep: int, faults: FaultPlan = FaultPlan(),
                 estimate_bytes: int = 0, async_save: bool = True,
                 progress: Callable[[], None] = lambda: None,
                 timeout_s: float | None = None, hash_algorithm: str = DEFAULT_HASH):
        self.paths = paths
        self.dist = dist
        self.keep = keep
        self.faults = faults
        self.estimate_bytes = estimate_bytes
        """Expected size of a checkpoint before the first one exists."""
        self.async_save = async_save
        self.hash_algorithm = hash_algorithm
        """Checksum of new checkpoints (checkpoint.hash); each manifest records its own."""
        self.progress = progress
        """Called whenever a save makes progress (a file written): the hang watchdog's beat."""
        self.writer: Writer | None = None
        self._pinned = PinnedPool()
        self._preloaded: dict[str, VerifiedFile] = {}
        """Files read and verified by newest_valid, by real path, until `load` deserialises them."""
        self.exclude_frozen = False
        """Leave frozen parameters out of checkpoints (their values come from the base model,
        model.pretrained_path, whose files the run verifies at every start)."""
        self.loaded_from_memory = 0
        """Files DeepSpeed loaded from what verification read (not read a second time)."""
        self._saving: Path | None = None
        self._in_place = False
        self._thread: threading.Thread | None = None
        self._result: SaveResult | None = None
        self._unreported: list[SaveResult] = []
        self.on_durable: Callable[[], None] = lambda: None
        """Rank 0: called once a checkpoint is durable (and pruned): the mirror's uploader."""
        self.collective_free = False
        """Whether the last save ran DeepSpeed's walk without its collectives (adapter)."""
        self.recent_seconds: list[float] = []
        """Total seconds (snapshot to manifest) of the last saves that completed."""
        # Background threads exchange file lists on their own group, never on training's.
        timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        self._group = torch.distributed.new_group(backend="gloo", **timeout) \
            if torch.distributed.is_initialized() else None

    def attach(self, engine: Any) -> None:
        """Make DeepSpeed save through telepathy's snapshotting checkpoint engine."""
        if self.writer is None:
            self.writer = Writer(serialization_zip=adapter.zipped_serialization(engine),
                                 algorithm=self.hash_algorithm)
        adapter.install_checkpoint_engine(engine, self._snapshot_file, self._load_file)

    def _snapshot_file(self, state_dict: Any, path: str) -> None:
        """DeepSpeed hands over one file's state: copy it to host memory, queue its write."""
        self.writer.snapshot_file(state_dict, Path(path), self._saving, self._pinned,
                                  host_as_is=self._in_place)

    def space(self) -> tuple[bool, int, int]:
        """Collective: (fits, free bytes, needed bytes) for the next checkpoint, rank 0's view."""
        verdict = None
        if self.dist.is_main:
            manifests = (read_manifest(p) for _, p in directory.candidates(self.paths.checkpoints))
            manifest = next((m for m in manifests if m is not None), None)  # the newest complete
            needed = manifest["bytes"] if manifest else self.estimate_bytes
            free = shutil.disk_usage(self.paths.root).free
            verdict = (fits(free, needed), free, needed)
        return self.dist.broadcast_object(verdict)

    # -- save ------------------------------------------------------------------------------
    def save(self, engine: Any, step: int, state: dict[str, Any], reason: str = "",
             wait: bool = False) -> float:
        """Collective: snapshot `step` and persist it in the background (or now, with `wait` or
        checkpoint.async_save off). Returns the seconds training was blocked (the stall); the
        result, with `reason`, comes from `wait()` or `completed()`."""
        self.wait()
        # Every time: whatever replaced the engine's checkpoint engine since (a user's code, a
        # benchmark's DeepSpeed save) must not write this checkpoint unhashed and unsnapshotted.
        self.attach(engine)
        started = time.time()
        name = checkpoint_name(step)
        ckpt = self.paths.checkpoint(step)
        hit = lambda point: self.faults.hit(point, step, self.dist.rank)  # noqa: E731
        if self.dist.is_main:
            self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
            if ckpt.exists():  # a leftover of a save that never completed
                directory.remove(ckpt, self.faults, self.dist.rank)
        self.dist.barrier()
        hit("save.start")
        self._saving = ckpt
        # A synchronous save (a preemption's, the last) blocks training until it is durable:
        # host tensors go to disk from where they are, without a snapshot copy.
        self._in_place = wait or not self.async_save
        self.writer.copy_s = 0.0
        try:
            self.collective_free = adapter.save_checkpoint(
                engine, str(self.paths.checkpoints), name, self.exclude_frozen)
        finally:
            self._saving = None
            self._in_place = False
        self.progress()
        (ckpt / "telepathy").mkdir(parents=True, exist_ok=True)
        tensors, meta = rng.capture()
        self.writer.submit_bytes(rank_state_file(self.dist.rank),
                                 safetensors_bytes(tensors, {"rng": json.dumps(meta)}),
                                 ckpt / rank_state_file(self.dist.rank))
        if self.dist.is_main:
            self.writer.submit_bytes(STATE, (json.dumps(state, indent=1, sort_keys=True) + "\n")
                                     .encode(), ckpt / STATE)
        stall = time.time() - started
        hit("save.engine_done")
        jobs = self.writer.take_jobs()
        best = state.get("best")  # checkpoint.keep_best: this step is the best once durable
        self._thread = threading.Thread(target=self._persist, name=f"ckpt-{step}", daemon=True,
                                        args=(step, reason, ckpt, jobs, started, stall,
                                              self.writer.copy_s,
                                              best if best and best["step"] == step else None))
        self._thread.start()
        if wait or not self.async_save:
            self.wait()
        return stall

    def _persist(self, step: int, reason: str, ckpt: Path, jobs: list, started: float,
                 stall: float, copy_s: float = 0.0, best: dict[str, Any] | None = None) -> None:
        """Background, every rank: finish this rank's files, agree, and (rank 0) commit."""
        hit = lambda point: self.faults.hit(point, step, self.dist.rank)  # noqa: E731
        entries: dict[str, Any] = {}
        error = None
        durable = None
        try:
            for i, (name, future) in enumerate(jobs):
                entries[name] = future.result()
                self.progress()
                if i == 0:
                    hit("save.file_written")
            for sub in {(ckpt / n).parent for n in entries}:
                fsync_dir(sub)
        except Exception as exc:  # disk full, I/O error: reported, never fatal to training
            error = f"rank {self.dist.rank}: {type(exc).__name__}: {exc}"
            # The other writes may still read the state (live tensors in a synchronous save):
            # they end before training can go on.
            concurrent.futures.wait([future for _, future in jobs])
        written = time.time()
        parts: list[Any] = [None] * self.dist.world_size
        if self._group is not None:
            torch.distributed.all_gather_object(parts, (entries, error), group=self._group)
        else:
            parts = [(entries, error)]
        errors = [e for _, e in parts if e]
        files = {n: e for part, _ in parts for n, e in part.items()}
        error = "; ".join(errors) or None
        if error is None and self.dist.is_main:
            try:
                hit("save.hashed")
                fsync_dir(ckpt)
                manifest = {"format": FORMAT, "hash": self.hash_algorithm, "step": step,
                            "world_size": self.dist.world_size,
                            "created": time.time(), "bytes": sum(e["size"] for e in files.values()),
                            "files": files}
                write_json_atomic(ckpt / MANIFEST, seal(manifest),
                                  before_replace=lambda: hit("save.manifest_tmp"))
                fsync_dir(self.paths.checkpoints)
                durable = time.time()
            except Exception as exc:
                error = f"rank 0: {type(exc).__name__}: {exc}"
            if error is None:
                try:  # the new checkpoint is durable: a failed prune must not undo it
                    hit("save.done")
                    if best is not None:
                        directory.record_best(self.paths, best)
                    self.prune()
                    self.on_durable()
                except Exception as exc:
                    log.warning("pruning after the save of step %d failed: %s: %s", step,
                                type(exc).__name__, exc)
        if error is not None and self.dist.is_main:
            shutil.rmtree(ckpt, ignore_errors=True)  # every rank is done with it
        done = time.time()
        durable = durable or done
        size = sum(e["size"] for e in files.values())
        self._result = SaveResult(
            step=step, reason=reason, checkpoint=ckpt.name, stall_s=round(stall, 3),
            copy_s=round(copy_s, 3),
            write_s=round(written - started - stall, 3), persist_s=round(done - started - stall, 3),
            seconds=round(done - started, 3), error=error,
            **({} if error else {"bytes": size, "files": len(files),
                                 "durable_s": round(durable - started, 3),
                                 "GB_per_s": round(size / 1e9 / max(durable - started, 1e-9), 3)}))

    def wait(self) -> SaveResult | None:
        """Finish the save in flight, if any; its result (also kept for `completed()`)."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        result, self._result = self._result, None
        if result is not None:
            if result.ok:
                self.recent_seconds = [*self.recent_seconds[-2:], result.seconds]
            self._unreported.append(result)
        return result

    def completed(self) -> list[SaveResult]:
        """Results of saves finished since the last call (without waiting for one in flight)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()
        out, self._unreported = self._unreported, []
        return out

    @property
    def expected_seconds(self) -> float | None:
        """What the next save may take: the longest of the last three (None before any)."""
        return max(self.recent_seconds) if self.recent_seconds else None

    # -- find and load ---------------------------------------------------------------------
    def newest_valid(self) -> tuple[Found | None, list[dict[str, Any]]]:
        """Collective: the newest checkpoint whose every file matches its manifest.

        Returns it (or None) and a list of rejected checkpoints with their problems.
        """
        rejected: list[dict[str, Any]] = []
        for step, ckpt in directory.candidates(self.paths.checkpoints):
            manifest = read_manifest(ckpt)
            if manifest is None:
                why = ("the manifest (MANIFEST.json) is damaged: bad JSON or its own checksum differs"
                       if (ckpt / MANIFEST).exists() else "no manifest (incomplete)")
                rejected.append({"checkpoint": ckpt.name, "problems": [why]})
                continue
            problems = self._verify(ckpt, manifest)
            self.progress()
            if problems:
                rejected.append({"checkpoint": ckpt.name, "problems": problems})
                continue
            state = json.loads((ckpt / STATE).read_text())
            return Found(ckpt, step, state), rejected
        return None, rejected

    def _verify(self, ckpt: Path, manifest: dict[str, Any]) -> list[str]:
        """Collective: every file of `ckpt` against its manifest, split across ranks by who
        loads what. At the same world size, the torch files this rank loads are read once,
        verified and kept in memory for `load` (reader.py); the rest is hashed from disk."""
        files = manifest["files"]
        mine = split_units(units_of(ckpt, manifest), self.dist.world_size)[self.dist.rank]
        if manifest.get("world_size") == self.dist.world_size:
            names = {n for n, i in mine if i >= 0 and n.endswith(".pt")
                     and owner(n, self.dist.world_size) == self.dist.rank}
        else:  # converted for this world size first: ds_to_universal reads every file itself
            names = set()
        problems, kept = [], {}
        room = _available_memory()
        for name in sorted(names):
            path = ckpt / name
            if not path.is_file() or path.stat().st_size != files[name]["size"]:
                names.discard(name)  # reported by the whole-file check
                continue
            # Held from here until load (the engine is built in between): only with room to spare.
            room -= files[name]["size"]
            if room < PRELOAD_RESERVE_BYTES:
                names.discard(name)
                continue
            try:
                verified, found = read_verified(path, files[name])
            except NotAZip:
                names.discard(name)
                continue
            except (OSError, MemoryError, RuntimeError, ValueError) as exc:
                # Verified from disk below instead; every rank still reaches the gather.
                log.warning("reading %s for verification failed (%s: %s); verifying it from disk",
                            path, type(exc).__name__, exc)
                names.discard(name)
                continue
            problems += found
            if verified is not None:
                kept[os.path.realpath(path)] = verified
            self.progress()
        rest = [(n, i) for n, i in mine if i < 0 or n not in names]
        problems += verify(ckpt, manifest, rest)
        problems = [p for part in self.dist.all_gather_object(problems) for p in part]
        if not problems:
            self._preloaded.update(kept)
        return problems

    def _load_file(self, path: str, map_location: Any) -> Any:
        """DeepSpeed loads one file: from memory when it was read while verifying, else torch.load
        (a file another rank verified)."""
        verified = self._preloaded.pop(os.path.realpath(path), None)
        if verified is not None:
            self.loaded_from_memory += 1
            return verified.load(map_location)
        return torch.load(path, map_location=map_location, weights_only=False)

    def load(self, engine: Any, found: Found, universal: Path | None = None,
             train_seed: int = 0) -> None:
        """Load a verified checkpoint into the engine and restore this rank's RNG state.

        `universal`: its verified universal copy, when the world size changed (universal.py);
        a rank that did not exist then gets a fresh RNG seeded from (train_seed, step, rank).
        """
        source = universal or found.path
        self.attach(engine)  # DeepSpeed reads through this manager (its verified files)
        try:
            load_path, _ = engine.load_checkpoint(str(source.parent), tag=source.name,
                                                  load_optimizer_states=True,
                                                  load_lr_scheduler_states=True,
                                                  load_module_strict=not self.exclude_frozen)
        finally:
            self._preloaded.clear()  # whatever DeepSpeed did not ask for
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {source}")
        if universal is not None:
            repaired = adapter.repair_universal_load(engine, universal)
            if repaired:
                log.info("after DeepSpeed's universal load, repaired: %s", "; ".join(repaired))
            if self.dist.rank >= found.state["world_size"]:
                rng.seed_all(rng.new_rank_seed(train_seed, found.step, self.dist.rank))
                return
        path = str(found.path / rank_state_file(self.dist.rank))
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads(f.metadata()["rng"])
        rng.restore(tensors, meta)

    # -- housekeeping (rank 0) -------------------------------------------------------------
    def set_aside(self, rejected: list[dict[str, Any]]) -> None:
        """After a fallback: delete incomplete leftovers, keep damaged ones in rejected/."""
        directory.set_aside(self.paths, rejected, self.keep)

    def prune(self) -> list[str]:
        """Keep the newest `keep` complete checkpoints (directory.prune, as the CLI prunes)."""
        return directory.prune(self.paths, self.keep, faults=self.faults, rank=self.dist.rank)

    def record_best(self, best: dict[str, Any]) -> None:
        """Collective: the checkpoint of `best["step"]`, already on disk (saved before its
        evaluation finished), is the best: best.json says so once it is complete."""
        self.wait()
        if self.dist.is_main and directory.is_complete(self.paths.checkpoint(best["step"])):
            directory.record_best(self.paths, best)
            self.on_durable()
        self.dist.barrier()

    def newest_complete_step(self) -> int:
        """Collective: the newest step with a complete checkpoint, rank 0's view (0: none)."""
        steps = directory.complete_steps(self.paths.checkpoints) if self.dist.is_main else None
        return self.dist.broadcast_object(steps[-1] if steps else 0)
