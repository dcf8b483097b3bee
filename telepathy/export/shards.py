"""Splitting weights into safetensors shards, as Hugging Face names and sizes them. Pure."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.I)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20 (Hugging Face's max_shard_size convention)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"--shard-size={text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    value, unit = match.groups()
    size = int(float(value) * _UNITS[(unit or "B").upper()])
    if size < 1:
        raise ValueError(f"--shard-size={text!r} must be at least one byte")
    return size


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Tensors, in order, into shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = []
    used = 0
    for name, size in sizes:
        if not shards or (used + size > max_bytes and shards[-1]):
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_names(count: int) -> list[str]:
    """model.safetensors, or model-00001-of-0000N.safetensors ... (with an index file)."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


INDEX = "model.safetensors.index.json"
