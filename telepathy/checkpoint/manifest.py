"""What a checkpoint's MANIFEST.json says, and what makes a checkpoint complete. Pure.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/`. It is **complete** when its
MANIFEST.json exists, parses, is of a known format and matches its own checksum: the manifest is
written last, after every file it lists is durable. It is **valid** when, in addition, every file
matches the manifest (sizes and the SHA-256 of every chunk; see `hashing.verify`). Nothing else
(no `latest` file, no directory name alone) makes a checkpoint count.

Format 3 hashes each file in chunks of `chunk_bytes` with the algorithm it names (`hash`:
xxh3_128 by default, blake3 or sha256; `checkpoint.hash`) and seals the manifest with a SHA-256 of
itself. Older manifests still verify: format 2 (SHA-256 chunks, `sha256_chunks`) and format 1
(one SHA-256 per file, no seal).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

MANIFEST = "MANIFEST.json"
FORMAT = "telepathy-checkpoint/3"
FORMATS = ("telepathy-checkpoint/1", "telepathy-checkpoint/2", FORMAT)
STATE = "telepathy/state.json"
"""The run state of a checkpoint (step, data position, config), written by rank 0."""


def rank_state_file(rank: int) -> str:
    """The RNG state of one rank (safetensors, no pickle)."""
    return f"telepathy/rank_{rank:05d}.safetensors"


def _canonical_sha256(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with a checksum of itself, so that any damaged byte in it is detected."""
    return {**manifest, "manifest_sha256": _canonical_sha256(manifest)}


def parse_manifest(text: str) -> dict[str, Any] | None:
    """A manifest from its text; None when it is damaged (bad JSON, its own checksum differs)
    or not a telepathy manifest. A checkpoint whose manifest parses is complete."""
    try:
        manifest = json.loads(text)
    except ValueError:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS \
            or not isinstance(manifest.get("files"), dict):
        return None
    if manifest["format"] != FORMATS[0] and \
            manifest.get("manifest_sha256") != _canonical_sha256(manifest):
        return None
    return manifest


def digest_of(chunks: list[str]) -> str:
    """One name for a file's content: the SHA-256 of its chunk digests."""
    return hashlib.sha256("".join(chunks).encode()).hexdigest()


def chunk_digests(entry: dict[str, Any]) -> tuple[str, list[str]] | None:
    """(algorithm, digest of every chunk) of a file's manifest entry; None for format 1."""
    if "chunks" in entry:
        return entry.get("hash", "sha256"), entry["chunks"]
    if "sha256_chunks" in entry:
        return "sha256", entry["sha256_chunks"]
    return None


def tasks(manifest: dict[str, Any], on_disk: list[str]) -> list[tuple[str, int]]:
    """The units of verification, (file, chunk index), over the manifest's files and the files
    found on disk (a stray file is a problem); chunk -1 stands for a check of the whole file
    (presence, size, format-1 hash)."""
    names = sorted(set(manifest["files"]) | set(on_disk))
    out = []
    for name in names:
        entry = manifest["files"].get(name)
        out.append((name, -1))
        digests = chunk_digests(entry) if entry else None
        if digests:
            out += [(name, i) for i in range(len(digests[1]))]
    return out
