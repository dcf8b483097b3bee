"""Read a checkpoint file once: verify it and deserialise it from the same bytes.

A torch.save file (zip, records stored uncompressed) is read in one pass: each tensor record
straight into the memory of the storage it becomes, everything else (the pickle, the zip headers)
into small buffers, and every chunk of the file is hashed as it lands and compared with the
manifest (chunks in parallel threads; reads and hashes release the GIL). Only when the whole
file matches is it deserialised, by torch's own unpickler (`torch.serialization._load`) over
those buffers: no second read, no copy. Against a plain `torch.load` (one read into fresh memory)
this adds only the hashing, which runs faster than any disk.

What is not a torch zip file of stored records (safetensors, JSON, the legacy torch format)
verifies with `hashing.verify` and loads with its own reader.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .hashing import hash_threads, new_hash
from .manifest import chunk_digests

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes
_PIECE = 64 * 2**20


class NotAZip(Exception):
    """The file is not a torch zip of stored records: verify and load it the ordinary way."""


@dataclass
class _Record:
    name: str  # without the archive's top folder, as torch names it ("data/0", "data.pkl")
    offset: int  # of its bytes in the file
    size: int
    header_offset: int  # of its local header


def zip_records(path: Path) -> list[_Record]:
    """Every record of a torch zip file, where its bytes lie (from the central directory and
    each local header). Raises NotAZip for anything else."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        # NotImplementedError: a flipped bit in a "version needed" or compression field
        raise NotAZip(f"{type(exc).__name__}: {exc}") from exc
    records = []
    with open(path, "rb") as f:
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or "/" not in info.filename:
                raise NotAZip(f"{info.filename}: compressed or outside the archive folder")
            try:  # a damaged central directory can name any offset, even a negative one
                header = os.pread(f.fileno(), _LOCAL_HEADER.size, info.header_offset)
            except (OSError, OverflowError) as exc:
                raise NotAZip(f"{info.filename}: its local header offset {info.header_offset} "
                              f"cannot be read ({exc})") from exc
            if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                raise NotAZip(f"{info.filename}: no local header at {info.header_offset}")
            *_, name_len, extra_len = _LOCAL_HEADER.unpack(header)
            offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            records.append(_Record(info.filename.split("/", 1)[1], offset, info.file_size,
                                   info.header_offset))
    return records


class VerifiedFile:
    """A torch zip file read once and verified: its records in memory, ready to deserialise."""

    def __init__(self, path: Path, records: dict[str, Any], by_offset: dict[int, Any],
                 headers: dict[str, int]):
        self.path = path
        self._records = records  # name -> bytes (small records) or UntypedStorage (tensors)
        self._by_offset = by_offset  # offset -> (name, UntypedStorage)
        self._offsets = {name: off for off, (name, _) in by_offset.items()}
        self._headers = headers  # name -> offset of its local header

    # The parts of torch's zip reader that torch.serialization._load uses.
    def has_record(self, name: str) -> bool:
        return name in self._records

    def get_record(self, name: str) -> bytes:
        return bytes(self._records[name])

    def get_record_offset(self, name: str) -> int:
        return self._offsets[name]

    def get_record_header_offset(self, name: str) -> int:
        return self._headers[name]

    def get_record_offset_no_read(self, header_offset: int, name: str, size: int,
                                  alignment: int) -> int:
        return self._offsets[name]  # (torch.utils.serialization.config.load.calculate_storage_offsets)

    def serialization_id(self) -> str:
        return bytes(self._records.get(".data/serialization_id", b"")).decode(errors="replace")

    def __getitem__(self, span: slice) -> torch.UntypedStorage:
        """`overall_storage[offset:offset + nbytes]`: the storage read for that record."""
        name, storage = self._by_offset[span.start]
        if storage.nbytes() != span.stop - span.start:
            raise ValueError(f"{self.path}: record {name} has {storage.nbytes()} bytes, the pickle "
                             f"expects {span.stop - span.start}")
        return storage

    def load(self, map_location: Any = None) -> Any:
        """Deserialise (what torch.load(path, map_location, weights_only=False) returns)."""
        return torch.serialization._load(self, map_location, pickle, overall_storage=self)


def read_verified(path: Path, entry: dict[str, Any],
                  pool: ThreadPoolExecutor | None = None) -> tuple[VerifiedFile | None, list[str]]:
    """Read a torch zip file once, hashing every chunk against its manifest `entry`.

    Returns (the file, []) when it matches, or (None, problems). Raises NotAZip for a file this
    reader does not handle (its caller verifies that one the ordinary way).
    """
    size = path.stat().st_size
    if size != entry["size"]:
        return None, [f"{path.name}: size {size} bytes, manifest says {entry['size']}"]
    digests = chunk_digests(entry)
    if digests is None:
        raise NotAZip("format-1 entry (one SHA-256 per file)")
    algorithm, expected = digests
    records = zip_records(path)
    # Where each byte of the file goes: tensor records into their own storage, the rest into
    # gap buffers (headers, pickle, small records), in file order.
    targets: list[tuple[int, memoryview]] = []  # (file offset, destination), in file order
    gaps: list[tuple[int, memoryview]] = []  # the part of targets that is not tensor data
    by_offset: dict[int, tuple[str, Any]] = {}
    small: dict[str, tuple[int, int]] = {}
    at = 0

    def gap(end: int) -> None:
        if end > at:
            gaps.append((at, memoryview(bytearray(end - at))))
            targets.append(gaps[-1])

    for rec in sorted(records, key=lambda r: r.offset):
        if rec.offset < at or rec.offset + rec.size > size:
            raise NotAZip(f"record {rec.name} at {rec.offset}+{rec.size} overlaps or overruns")
        if rec.name.startswith("data/"):
            gap(rec.offset)
            tensor = torch.empty(rec.size, dtype=torch.uint8)
            targets.append((rec.offset, memoryview(tensor.numpy()).cast("B")))
            by_offset[rec.offset] = (rec.name, tensor.untyped_storage())
            at = rec.offset + rec.size
        else:
            small[rec.name] = (rec.offset, rec.size)
    gap(size)
    chunk = entry["chunk_bytes"]

    def check(index: int) -> str | None:
        start, end = index * chunk, min((index + 1) * chunk, size)
        digest = new_hash(algorithm)
        # A descriptor of its own: the kernel's readahead follows each chunk's sequential reads.
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_SEQUENTIAL)
            for off, view in targets:
                a, b = max(start, off), min(end, off + len(view))
                while a < b:
                    piece = view[a - off:min(b, a + _PIECE) - off]
                    n = os.preadv(fd, [piece], a)
                    if n <= 0:
                        return f"{path.name}: read {n} bytes at {a} (file shrank?)"
                    digest.update(piece[:n])
                    a += n
        finally:
            os.close(fd)
        found = digest.hexdigest()
        if found != expected[index]:
            return (f"{path.name}: bytes {start}-{end - 1} have {algorithm} {found}, "
                    f"manifest says {expected[index]}")
        return None

    n_chunks = max(1, -(-size // chunk))
    if len(expected) != n_chunks:
        return None, [f"{path.name}: {n_chunks} chunks, manifest lists {len(expected)}"]
    own = pool is None
    pool = pool or ThreadPoolExecutor(hash_threads(), thread_name_prefix="ckpt-read")
    try:
        problems = [p for p in pool.map(check, range(n_chunks)) if p]
    finally:
        if own:
            pool.shutdown()
    if problems:
        return None, problems
    named: dict[str, Any] = {name: storage for name, storage in by_offset.values()}
    for name, (off, n) in small.items():
        inside = [(base, view) for base, view in gaps if base <= off and off + n <= base + len(view)]
        if not inside:
            raise NotAZip(f"record {name} at {off}+{n} lies in no gap between tensor records")
        base, view = inside[0]
        named[name] = view[off - base:off - base + n]
    return VerifiedFile(path, named, by_offset,
                        {r.name: r.header_offset for r in records}), []
