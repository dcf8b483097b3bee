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


def check(cfg: Config, paths: RunPaths) -> None:
    """Refuse (ResumeRefused: exit 2) a start whose base differs from the one the run recorded;
    reads only."""
    recorded = json.loads(paths.base_model.read_text()) if paths.base_model.is_file() else None
    if not cfg.model.pretrained_path or recorded is None:
        return
    base = Path(cfg.model.pretrained_path)
    now = fingerprint(base)
    before = recorded["files"]
    changed = [n for n in sorted(set(before) | set(now)) if before.get(n) != now.get(n)]
    if changed:
        what = "; ".join(f"{n} ({_how(before.get(n), now.get(n))})" for n in changed[:5])
        raise ResumeRefused(
            f"the base model at model.pretrained_path={str(base)!r} changed since this run "
            f"recorded it ({paths.base_model.name}): {what}. The run's checkpoints hold only what "
            "trains, so it must resume on the same base: restore those files, or start a new run "
            "directory for the new base")


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
    if not cfg.model.pretrained_path or paths.base_model.is_file():
        return
    base = Path(cfg.model.pretrained_path)
    write_json_atomic(paths.base_model, {"path": str(base.absolute()),
                                         "files": fingerprint(base)})
    log.info("recorded the checksums of the base model's files in %s", paths.base_model)
