"""A prepared file of examples (instruction tuning): the token ids of every example end to end,
a loss mask beside them, and where each example starts. One safetensors file, so any tool that
reads safetensors reads it (`safetensors.numpy.load_file`), and the trainer memory-maps it.

Tensors (`input_ids` and `loss_mask` have one entry per token, `offsets` one per example + 1):

- `input_ids`: uint16 or uint32, the examples' tokens end to end;
- `loss_mask`: uint8, 1 where predicting this token (from the tokens before it in its example)
  counts in the loss (the answers), 0 elsewhere (the prompt, the chat markup); the first token
  of an example is never predicted and is always 0;
- `offsets`: int64, example `i` is tokens `offsets[i]:offsets[i + 1]`;
- `loss_tokens`: int64, per example, the tokens that count in its loss (so that a start needs
  no pass over the masks: only an example cut to a row is counted again).

`__metadata__` holds `{"format": FORMAT, "telepathy": <the sidecar as JSON>}`, so the file
describes itself even without its sidecar (FILE.json, the same JSON for people and tools).

Written by `ExamplesWriter`: the three arrays stream into temp files as examples come (memory
holds one example), and `finish` assembles header and arrays into one temp file, fsyncs it and
renames it into place. Nothing half-written is ever left under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DataError

FORMAT = "telepathy-examples/1"
TENSORS = ("input_ids", "loss_mask", "offsets", "loss_tokens")
_ST_DTYPES = {"uint16": "U16", "uint32": "U32", "uint8": "U8", "int64": "I64"}
_ALIGN = 8


class ExamplesWriter:
    """Append examples, then `finish(meta)` (or `abort()`); a context manager aborts on error."""

    def __init__(self, out: str | Path, dtype: str):
        self.out = Path(out)
        self.dtype = np.dtype(dtype)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        stem = f".{self.out.name}.tmp-{os.getpid()}"
        self._tmp = {name: self.out.with_name(f"{stem}.{name}")
                     for name in ("input_ids", "loss_mask", "all")}
        self._files = {name: open(self._tmp[name], "wb") for name in ("input_ids", "loss_mask")}
        self.offsets: list[int] = [0]
        self.counts: list[int] = []
        self.tokens = 0
        self.loss_tokens = 0

    def __enter__(self) -> ExamplesWriter:
        return self

    def __exit__(self, kind, *_: Any) -> None:
        if kind is not None:
            self.abort()

    def add(self, ids: list[int] | np.ndarray, mask: list[int] | np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        mask = np.asarray(mask, dtype=np.uint8).copy()
        if ids.shape != mask.shape or ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"an example needs as many mask entries as tokens ({ids.shape} "
                             f"vs {mask.shape}), at least one")
        mask[0] = 0  # nothing predicts an example's first token
        self._files["input_ids"].write(ids.tobytes())
        self._files["loss_mask"].write(mask.tobytes())
        self.tokens += int(ids.size)
        self.counts.append(int(mask.sum()))
        self.loss_tokens += self.counts[-1]
        self.offsets.append(self.tokens)

    @property
    def examples(self) -> int:
        return len(self.offsets) - 1

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Write the file (atomically); returns `meta` with format, counts and sha256 added."""
        for f in self._files.values():
            f.close()
        arrays = {"offsets": np.asarray(self.offsets, dtype=np.int64),
                  "loss_tokens": np.asarray(self.counts, dtype=np.int64)}
        parts = {"input_ids": (self._tmp["input_ids"], self.dtype.name, self.tokens),
                 "loss_mask": (self._tmp["loss_mask"], "uint8", self.tokens),
                 "offsets": ("offsets", "int64", arrays["offsets"].size),
                 "loss_tokens": ("loss_tokens", "int64", arrays["loss_tokens"].size)}
        header: dict[str, Any] = {}
        start = 0
        for name, (_, dtype, count) in parts.items():
            size = count * np.dtype(dtype).itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [count],
                            "data_offsets": [start, start + size]}
            start += size
        meta = {**meta, "format": FORMAT, "dtype": self.dtype.name, "tokens": self.tokens,
                "examples": self.examples, "loss_tokens": self.loss_tokens}
        digest = hashlib.sha256()
        with open(self._tmp["all"], "wb") as out:
            meta_json = json.dumps(meta, sort_keys=True)
            head = json.dumps({**header, "__metadata__": {"format": FORMAT,
                                                          "telepathy": meta_json}},
                              separators=(",", ":")).encode()
            head += b" " * (-len(head) % _ALIGN)
            out.write(struct.pack("<Q", len(head)) + head)
            for path, _, _ in parts.values():
                if path in arrays:
                    data = arrays[path].tobytes()
                    out.write(data)
                    digest.update(data)
                    continue
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
            out.flush()
            os.fsync(out.fileno())
        meta["sha256"] = digest.hexdigest()
        os.replace(self._tmp["all"], self.out)
        self._cleanup()
        return meta

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        for path in self._tmp.values():
            path.unlink(missing_ok=True)

    def _cleanup(self) -> None:
        for name, path in self._tmp.items():
            if name != "all":
                path.unlink(missing_ok=True)


def is_examples_file(path: str | Path) -> bool:
    """Whether `path` is a prepared examples file (its own header says so)."""
    try:
        return read_header(path)[0].get("__metadata__", {}).get("format") == FORMAT
    except (OSError, DataError):
        return False


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of `path` and where its data begins."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise DataError(f"{path} is too short to be a prepared examples file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20 or n > path.stat().st_size - 8:
            raise DataError(f"{path} is not a prepared examples file (no safetensors header)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise DataError(f"{path} is not a prepared examples file (its header is not "
                            "JSON)") from None
    if not isinstance(header, dict):
        raise DataError(f"{path} is not a prepared examples file")
    return header, 8 + n


class Examples:
    """A prepared examples file, memory-mapped: `tokens(i)`, `mask(i)`, `lengths`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, base = read_header(self.path)
        meta = header.get("__metadata__", {})
        if meta.get("format") != FORMAT or any(t not in header for t in TENSORS):
            raise DataError(f"{self.path} is not a prepared examples file ({FORMAT}); make it "
                            "with telepathy data prepare --format chat|prompt-completion")
        self.meta: dict[str, Any] = json.loads(meta.get("telepathy", "{}"))
        inverse = {v: k for k, v in _ST_DTYPES.items()}
        arrays = {}
        for name in TENSORS:
            entry = header[name]
            begin, end = entry["data_offsets"]
            dtype = np.dtype(inverse[entry["dtype"]])
            count = (end - begin) // dtype.itemsize
            arrays[name] = (np.memmap(self.path, dtype=dtype, mode="r", offset=base + begin,
                                      shape=(count,)) if count else np.empty(0, dtype=dtype))
        self.input_ids = arrays["input_ids"]
        self.loss_mask = arrays["loss_mask"]
        self.offsets = np.asarray(arrays["offsets"])
        self.loss_tokens = np.asarray(arrays["loss_tokens"])
        if self.offsets.size < 1 or self.offsets[-1] != self.input_ids.size or \
                self.loss_tokens.size != self.offsets.size - 1:
            raise DataError(f"{self.path}: its offsets do not match its {self.input_ids.size} "
                            "tokens; the file is damaged, prepare it again")
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return int(self.lengths.size)

    def tokens(self, i: int) -> np.ndarray:
        return np.asarray(self.input_ids[self.offsets[i]:self.offsets[i + 1]])

    def mask(self, i: int) -> np.ndarray:
        return np.asarray(self.loss_mask[self.offsets[i]:self.offsets[i + 1]])

