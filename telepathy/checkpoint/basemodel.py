"""The frozen base of a fine-tuning run: checkpoints leave it out (it stays at
model.pretrained_path), so the run records the checksums of its files at the first start and
every later start verifies them before anything else happens. A base that changed under the run
would make every later step differ from the one the checkpoint continued: refused, naming the
file, with the run directory untouched."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..config import Config
from ..core.errors import ResumeRefused
from ..core.fsutil import write_json_atomic
from ..core.paths import RunPaths
from .hashing import hash_file

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model")
"""The files of a model directory that decide its weights: shards, their index, config.json
(tokenizer files too; README and the like are not hashed)."""


def files_of(base: Path) -> list[Path]:
    return sorted(p for p in base.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.endswith(WEIGHT_SUFFIXES))


def fingerprint(base: Path) -> dict[str, Any]:
    """{file name: manifest entry (bytes, chunk checksums)} of the base's files, hashed in
    parallel."""
    files = files_of(base)
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        entries = list(pool.map(hash_file, files))
    return {f.name: e for f, e in zip(files, entries)}


def bases(cfg: Config) -> list[Path]:
    """The directories of the run's frozen pretrained weights: model.pretrained_path, or
    model.base_paths of a model.module (a file may stand for a directory)."""
    if cfg.model.pretrained_path:
        return [Path(cfg.model.pretrained_path)]
    return [Path(p) for p in cfg.model.base_paths or ()]


def key_of(cfg: Config) -> str:
    return "model.pretrained_path" if cfg.model.pretrained_path else "model.base_paths"


def recorded_bases(paths: RunPaths) -> list[dict[str, Any]] | None:
    """What the run recorded: [{path, files}] (a single base's file as a list of one)."""
    if not paths.base_model.is_file():
        return None
    recorded = json.loads(paths.base_model.read_text())
    return recorded.get("bases", [recorded])


def fingerprint_of(base: Path, key: str) -> dict[str, Any]:
    if base.is_file():
        return {base.name: hash_file(base)}
    if not base.is_dir():
        raise ResumeRefused(f"{key}: {str(base)!r} does not exist; the run's frozen weights are "
                            "read from it: restore it, or fix the path")
    return fingerprint(base)


def changes(cfg: Config, recorded: list[dict[str, Any]]) -> list[str]:
    """What differs between the bases now and as recorded: "DIR/FILE (how)" each."""
    now = bases(cfg)
    if len(now) != len(recorded):
        return [f"{len(recorded)} base directories recorded, {len(now)} now"]
    found = []
    for base, before in zip(now, recorded):
        files = fingerprint_of(base, key_of(cfg))
        found += [f"{base / n} ({_how(before['files'].get(n), files.get(n))})"
                  for n in sorted(set(before["files"]) | set(files))
                  if before["files"].get(n) != files.get(n)]
    return found


def check(cfg: Config, paths: RunPaths) -> None:
    """Refuse (ResumeRefused: exit 2) a start whose bases differ from those the run recorded;
    reads only."""
    recorded = recorded_bases(paths)
    if not bases(cfg) or recorded is None:
        return
    changed = changes(cfg, recorded)
    if changed:
        key = key_of(cfg)
        raise ResumeRefused(
            f"the frozen weights of {key}={[str(b) for b in bases(cfg)]} changed since this run "
            f"recorded them ({paths.base_model.name}): {'; '.join(changed[:5])}. The run's "
            "checkpoints hold only what trains, so it must resume on the same weights: restore "
            "those files, or start a new run directory for the new ones")


def _how(before: dict | None, now: dict | None) -> str:
    if before is None:
        return "new file"
    if now is None:
        return "missing"
    if before["size"] != now["size"]:
        return f"{before['size']} -> {now['size']} bytes"
    return "content differs"


def record(cfg: Config, paths: RunPaths) -> None:
    """At the first start of a run on a base (rank 0, under the run lock): its checksums."""
    if not bases(cfg) or paths.base_model.is_file():
        return
    if cfg.model.pretrained_path:  # the layout of runs before model.base_paths existed
        base = Path(cfg.model.pretrained_path)
        write_json_atomic(paths.base_model, {"path": str(base.absolute()),
                                             "files": fingerprint(base)})
    else:
        write_json_atomic(paths.base_model, {"bases": [
            {"path": str(b.absolute()), "files": fingerprint_of(b, key_of(cfg))}
            for b in bases(cfg)]})
    log.info("recorded the checksums of the base model's files in %s", paths.base_model)
