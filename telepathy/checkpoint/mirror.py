"""Checkpoints that outlive the cluster: a verified copy on object storage (checkpoint.mirror).

The mirror holds the same layout as the run directory's `checkpoints/`: one prefix per
checkpoint, `MIRROR/checkpoints/step_XXXXXXXX/...`, and, as locally, a mirrored checkpoint is
**complete** only once its MANIFEST.json is there and parses: it is uploaded last, after every file
it lists is uploaded and verified. A copy cut short (a preemption, a SIGKILL, a server gone) has
no manifest and never counts; the next attempt (the same allocation or the next) finishes it.

**Verified by reading back.** Every uploaded object is read back and hashed with the algorithm and
chunks of the manifest, and compared with the manifest's digests. The store's own checksums are
not used: an S3 ETag is the MD5 of the bytes only for a single-part upload without KMS
encryption (a multipart ETag is an MD5 of MD5s, and MinIO and Ceph differ again), and the
additional S3 checksums (CRC32, SHA-256) are not offered by every S3-compatible store. Reading
back costs a download of what was uploaded (usually free inside a site or region) and proves the
one thing that matters: what a resume will read hashes to what the save recorded. An object
already there that verifies is not uploaded again (an interrupted upload goes on where it was).

Everything goes through fsspec (`s3://` with s3fs, or any fsspec URL); the endpoint and
credentials come from the standard places (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, ~/.aws/config and credentials, AWS_PROFILE) or checkpoint.mirror_options.
Rank 0 uploads, from the run directory every rank shares, in one background thread
(`Uploader`): training never waits for it. A failure is retried with backoff and reported
(mirror_failed), never fatal. At the end of the process the upload gets what is left of the time
(after a preemption signal, of SLURM's grace); what is unfinished goes on in the next allocation.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError, ConfigError
from ..core.events import Event
from ..core.fsutil import fsync_dir
from ..core.paths import RunPaths, checkpoint_name, checkpoint_step
from ..testing.faults import FaultPlan
from . import directory
from .hashing import new_hash
from .manifest import MANIFEST, chunk_digests, parse_manifest

log = logging.getLogger(__name__)

INSTALL = "pip install 'telepathy[mirror]'"
READ_BYTES = 8 * 2**20
"""Bytes per read when an object is read back or downloaded (memory held per transfer)."""
BACKOFF_S = (2.0, 60.0)
"""First and longest wait before an upload that failed is tried again (doubling)."""
S3_OPTIONS = {"config_kwargs": {"connect_timeout": 10, "read_timeout": 120,
                                "retries": {"max_attempts": 3, "mode": "standard"}}}
"""s3fs's client: a server that does not answer is given up on in seconds, not minutes (the
uploader retries on its own schedule); s3fs splits files above 50 MiB into multipart uploads."""


class MirrorError(RuntimeError):
    """An upload or a download that did not verify."""


def open_store(url: str, options: dict[str, Any] | None = None) -> Store:
    """The mirror at `url`; a ConfigError naming the missing package and the install command."""
    try:
        import fsspec
    except ImportError as exc:
        raise ConfigError(f"checkpoint.mirror {url!r} needs fsspec; install it with: {INSTALL}") \
            from exc
    protocol = fsspec.utils.get_protocol(url)
    extra = dict(S3_OPTIONS) if protocol in ("s3", "s3a") else {}
    if protocol in ("s3", "s3a"):
        extra["use_listings_cache"] = False
    try:  # a new client each time: fsspec's cached one keeps the credentials it was made with
        fs, root = fsspec.core.url_to_fs(url, **{**extra, "skip_instance_cache": True,
                                                 **(options or {})})
    except ImportError as exc:
        raise ConfigError(f"checkpoint.mirror {url!r} needs the {protocol}:// client "
                          f"({exc.name or exc}); install it with: {INSTALL}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"checkpoint.mirror {url!r}: {exc}; give an fsspec URL such as "
                          "s3://bucket/prefix/run") from exc
    return Store(url, fs, root.rstrip("/"))


def is_url(text: str) -> bool:
    """Whether a command-line path names a mirror (an fsspec URL) rather than a directory."""
    return "://" in str(text) and not str(text).startswith("file://")


class Store:
    """One mirror: its checkpoints, listed, read back, uploaded, downloaded, removed."""

    def __init__(self, url: str, fs: Any, root: str):
        self.url = url
        self.fs = fs
        self.root = root

    def path(self, name: str = "", rel: str = "") -> str:
        return "/".join(p for p in (self.root, "checkpoints", name, rel) if p)

    def _fresh(self) -> None:
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate()

    def names(self) -> list[tuple[int, str]]:
        """Checkpoint prefixes on the mirror, newest first, complete or not."""
        self._fresh()
        try:
            found = self.fs.ls(self.path(), detail=False)
        except FileNotFoundError:
            return []
        steps = [(checkpoint_step(str(p).rstrip("/").rsplit("/", 1)[-1]), p) for p in found]
        return sorted(((s, checkpoint_name(s)) for s, _ in steps if s is not None), reverse=True)

    def manifest(self, name: str) -> dict[str, Any] | None:
        """A mirrored checkpoint's manifest; None: missing or damaged (the checkpoint does not
        count)."""
        try:
            return parse_manifest(self.fs.cat_file(self.path(name, MANIFEST)).decode())
        except (FileNotFoundError, ValueError):
            return None

    def complete(self) -> list[tuple[int, str, dict[str, Any]]]:
        """(step, name, manifest) of the complete mirrored checkpoints, newest first."""
        out = []
        for step, name in self.names():
            manifest = self.manifest(name)
            if manifest is not None:
                out.append((step, name, manifest))
        return out

    def check(self, name: str, rel: str, entry: dict[str, Any],
              sink: Callable[[bytes], None] | None = None) -> str | None:
        """Read one mirrored file back and compare it with its manifest entry (size, every
        chunk's digest); None: it matches. `sink` receives the bytes as they are read."""
        path = self.path(name, rel)
        try:
            size = self.fs.size(path)
        except FileNotFoundError:
            return f"{rel}: missing on the mirror"
        if size != entry["size"]:
            return f"{rel}: {size} bytes on the mirror, manifest says {entry['size']}"
        digests = chunk_digests(entry)
        algorithm, expected = digests if digests else ("sha256", [entry["sha256"]])
        chunk = entry.get("chunk_bytes", max(size, 1)) if digests else max(size, 1)
        with self.fs.open(path, "rb", block_size=READ_BYTES) as f:
            for index, want in enumerate(expected):
                digest, left = new_hash(algorithm), min(chunk, size - index * chunk)
                while left > 0:
                    block = f.read(min(READ_BYTES, left))
                    if not block:
                        return f"{rel}: ends at byte {size - left} on the mirror"
                    digest.update(block)
                    if sink is not None:
                        sink(block)
                    left -= len(block)
                if digest.hexdigest() != want:
                    end = min((index + 1) * chunk, size) - 1
                    return (f"{rel}: bytes {index * chunk}-{end} on the mirror have {algorithm} "
                            f"{digest.hexdigest()}, manifest says {want}")
        return None

    def upload(self, local: Path, name: str, manifest: dict[str, Any],
               faults: FaultPlan = FaultPlan(), step: int = -1) -> tuple[int, int]:
        """Upload one local checkpoint: each file not already there and verified, then the
        manifest last. Returns (files uploaded, bytes uploaded). A file that does not read back
        as the manifest says raises MirrorError."""
        uploaded = sent = 0
        for rel, entry in sorted(manifest["files"].items()):
            if self.check(name, rel, entry) is None:
                continue  # uploaded before (an interrupted upload goes on here)
            self.fs.put_file(str(local / rel), self.path(name, rel))
            problem = self.check(name, rel, entry)
            if problem is not None:
                raise MirrorError(f"{name}: {problem} after upload")
            uploaded += 1
            sent += entry["size"]
        faults.hit("mirror.files_uploaded", step, 0)
        body = (local / MANIFEST).read_bytes()
        self.fs.pipe_file(self.path(name, MANIFEST), body)
        if self.fs.cat_file(self.path(name, MANIFEST)) != body:
            raise MirrorError(f"{name}: {MANIFEST} reads back different from what was uploaded")
        return uploaded, sent

    def remove(self, name: str) -> None:
        """Delete a mirrored checkpoint: its manifest first, so that a removal cut short leaves
        it visibly incomplete, never a complete checkpoint missing files."""
        try:
            self.fs.rm_file(self.path(name, MANIFEST))
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(self.path(name), recursive=True)
        except FileNotFoundError:
            pass

    def download(self, name: str, manifest: dict[str, Any], into: Path) -> list[str]:
        """Copy a mirrored checkpoint to the directory `into` (created), verifying every chunk as
        it arrives; the manifest is written last. Problems found (empty: `into` is complete)."""
        into.mkdir(parents=True)
        problems = []
        for rel, entry in sorted(manifest["files"].items()):
            target = into / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                problem = self.check(name, rel, entry, sink=f.write)
                f.flush()
                os.fsync(f.fileno())
            if problem is not None:
                problems.append(problem)
        if problems:
            return problems
        for sub in {(into / rel).parent for rel in manifest["files"]}:
            fsync_dir(sub)
        (into / MANIFEST).write_bytes(self.fs.cat_file(self.path(name, MANIFEST)))
        fsync_dir(into)
        return []


def fetch(store: Store, paths: RunPaths, newer_than: int,
          report: Callable[..., None] = lambda event, **fields: None) -> int | None:
    """Rank 0, at a start: download the newest complete mirrored checkpoint newer than step
    `newer_than` (the newest valid local one; -1: none) into the run directory, verified as it
    arrives. A damaged one is reported (mirror_rejected) and the previous one tried, as a resume
    falls back locally. Returns the step fetched, or None."""
    for step, name, manifest in store.complete():
        if step <= newer_than:
            return None
        started = time.time()
        partial = paths.checkpoints / f".mirror-{name}"
        shutil.rmtree(partial, ignore_errors=True)
        problems = store.download(name, manifest, partial)
        if problems:
            shutil.rmtree(partial, ignore_errors=True)
            log.warning("mirrored checkpoint %s is damaged, trying the previous one: %s", name,
                        "; ".join(problems))
            report(Event.MIRROR_REJECTED, checkpoint=name, problems=problems)
            # It stops counting (its manifest goes; its files stay for inspection until pruned),
            # so that the uploader replaces it with a good copy when the run has one.
            store.fs.rm_file(store.path(name, MANIFEST))
            continue
        target = paths.checkpoint(step)
        if target.exists():  # an incomplete leftover of the same step (a complete one is older
            shutil.rmtree(target)  # than what the mirror has only if it failed verification)
        partial.rename(target)
        fsync_dir(paths.checkpoints)
        seconds = time.time() - started
        log.info("fetched checkpoint %s from the mirror %s (%d bytes, %.1f s)", name, store.url,
                 manifest["bytes"], seconds)
        report(Event.MIRROR_FETCHED, checkpoint=name, step=step, bytes=manifest["bytes"],
               seconds=round(seconds, 3))
        return step
    return None


def prune(store: Store, keep: int, best: int | None, uploading: set[str]) -> list[str]:
    """Keep the newest `keep` complete mirrored checkpoints and the best; delete the complete
    ones older than those, and incomplete ones older than the newest complete one that are not
    about to be uploaded. Fewer than `keep` complete: none is deleted. Returns the names."""
    names = store.names()
    complete = [(s, n) for s, n in names if store.manifest(n) is not None]
    if not complete:
        return []
    kept = [s for s, _ in complete[:keep]]
    oldest_kept = kept[-1] if len(kept) == keep else -1
    newest = complete[0][0]
    done = {n for _, n in complete}
    doomed = [n for s, n in complete if s < oldest_kept and s != best]
    doomed += [n for s, n in names if n not in done and s < newest and n not in uploading]
    for name in sorted(doomed):
        store.remove(name)
    return sorted(doomed)


class Uploader:
    """Rank 0's background copy of the run's checkpoints to the mirror.

    `wake()` after each durable save; each pass uploads what the mirror lacks (the newest `keep`
    complete local checkpoints and the best, newest first) and prunes the mirror. A failing pass
    is retried after a backoff (2 s doubling to 60 s) and reported once per failing streak and
    then at most once a minute; `finish` gives the upload the time left at the end."""

    def __init__(self, store: Store, paths: RunPaths, keep: int,
                 report: Callable[..., None], faults: FaultPlan = FaultPlan()):
        self.store = store
        self.paths = paths
        self.keep = keep
        self.report = report
        self.faults = faults
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._lock = threading.Lock()
        self._pending = True
        self.failures = 0
        self.uploaded: list[str] = []
        self._thread = threading.Thread(target=self._run, name="ckpt-mirror", daemon=True)

    def start(self) -> Uploader:
        self._thread.start()
        return self

    def wake(self) -> None:
        """A checkpoint became durable (or the run starts): look for work."""
        with self._lock:
            self._pending = True
            self._idle.clear()
        self._wake.set()

    def _wanted(self) -> list[tuple[int, Path]]:
        complete = directory.complete_steps(self.paths.checkpoints)[::-1]
        best = directory.best_step(self.paths)
        steps = complete[:self.keep] + ([best] if best in complete[self.keep:] else [])
        return [(s, self.paths.checkpoint(s)) for s in steps]

    def sync(self) -> None:
        """One pass: upload what the mirror lacks, newest first, then prune the mirror."""
        wanted = self._wanted()
        there = {n for _, n, _ in self.store.complete()}
        for step, local in wanted:
            if local.name in there:
                continue
            manifest = directory.read_manifest(local)
            if manifest is None:
                continue  # pruned locally since it was listed
            started = time.time()
            try:
                files, sent = self.store.upload(local, local.name, manifest, self.faults, step)
            except FileNotFoundError:
                if not local.exists():
                    continue  # pruned locally while it was uploaded: no longer wanted
                raise
            seconds = time.time() - started
            self.uploaded.append(local.name)
            log.info("mirrored %s to %s (%d files, %d bytes uploaded, %.1f s)", local.name,
                     self.store.url, files, sent, seconds)
            self.report(Event.MIRROR_UPLOADED, checkpoint=local.name, step=step,
                        bytes=manifest["bytes"], uploaded_bytes=sent, uploaded_files=files,
                        seconds=round(seconds, 3))
        removed = prune(self.store, self.keep, directory.best_step(self.paths),
                        {p.name for _, p in wanted})
        if removed:
            log.info("pruned on the mirror: %s", ", ".join(removed))

    def _run(self) -> None:
        wait_s: float | None = None
        failing_since = last_report = 0.0
        while not self._stop.is_set():
            self._wake.wait(wait_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            with self._lock:
                self._pending = False
            try:
                self.sync()
            except Exception as exc:  # a server gone, a refusal, a bad read-back: retried
                now = time.time()
                self.failures += 1
                wait_s = min(BACKOFF_S[0] * 2 ** min(self.failures - 1, 10), BACKOFF_S[1])
                failing_since = failing_since or now
                if self.failures == 1 or now - last_report >= BACKOFF_S[1]:
                    last_report = now
                    log.warning("mirror upload to %s failed (%s: %s); retrying in %.0f s",
                                self.store.url, type(exc).__name__, exc, wait_s)
                    self.report(Event.MIRROR_FAILED, url=self.store.url,
                                error=f"{type(exc).__name__}: {exc}"[:500],
                                failures=self.failures, failing_s=round(now - failing_since, 1),
                                retry_in_s=wait_s)
                continue
            if self.failures:
                log.info("mirror %s reachable again after %d failed attempts", self.store.url,
                         self.failures)
            self.failures, failing_since, wait_s = 0, 0.0, None
            with self._lock:
                if not self._pending:
                    self._idle.set()

    def stop(self) -> None:
        """Stop at once (the process is leaving; what is unfinished goes on at the next start)."""
        self._stop.set()
        self._wake.set()

    def finish(self, budget_s: float) -> bool:
        """At the end of the process: let the uploads in hand finish within `budget_s`, then
        stop. Whether everything wanted is on the mirror; if not it is reported
        (mirror_unfinished) and the next allocation goes on with it."""
        self.wake()
        done = self._idle.wait(max(budget_s, 0.0))
        self._stop.set()
        self._wake.set()
        if not done:
            pending = [p.name for _, p in self._wanted()]
            log.warning("mirror upload unfinished after %.0f s; the next allocation goes on "
                        "with it", budget_s)
            self.report(Event.MIRROR_UNFINISHED, url=self.store.url, budget_s=round(budget_s, 1),
                        wanted=pending)
        return done


def verify(store: Store, name: str, manifest: dict[str, Any]) -> list[str]:
    """Every file of a mirrored checkpoint read back against its manifest (nothing written)."""
    return [p for rel, entry in sorted(manifest["files"].items())
            if (p := store.check(name, rel, entry)) is not None]


def download_for_reading(url: str, step: int | None, into: Path,
                         options: dict[str, Any] | None = None) -> Path:
    """A mirrored checkpoint (the newest complete one, or `step`) downloaded and verified into
    `into/checkpoints/`, for the commands that read a run directory (export). Its path."""
    store = open_store(url, options)
    for s, name, manifest in store.complete():
        if step is None or s == step:
            target = RunPaths.at(into).checkpoint(s)
            target.parent.mkdir(parents=True, exist_ok=True)
            problems = store.download(name, manifest, target)
            if problems:
                raise CheckpointError(f"{url}: checkpoint {name} does not match its manifest: "
                                      + "; ".join(problems[:3]))
            return target
    raise CheckpointError(f"{url}: no complete checkpoint" + (f" of step {step}" if step else "")
                          + " on the mirror (a checkpoint counts once its MANIFEST.json is there)")
