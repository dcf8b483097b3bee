"""Rows of instruction data, one at a time, each with where it came from (for errors) and the
share of the input it stands for (for the progress bar): JSON Lines (`.jsonl`, `.json`),
Parquet (`.parquet`, through pyarrow) and a directory written by `datasets`' `save_to_disk`
(read with `load_from_disk`). Memory holds a line, or a batch of Parquet rows, never the input.
pyarrow and datasets are optional: `pip install 'telepathy[datasets]'`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_BATCH = 256
"""Parquet rows decoded at a time."""


@dataclass(frozen=True)
class Row:
    value: Any
    where: str
    """`file:line` (JSON Lines), `file row N` (Parquet, datasets; from 1)."""
    size: float
    """Bytes of input this row stands for."""


def kind_of(path: Path) -> str:
    """jsonl, parquet or datasets; anything else is refused with what is read."""
    if path.is_dir():
        return "datasets"
    if not path.is_file():
        raise DataError(f"no such input: {path}")
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise DataError(f"{path}: an input is a JSON Lines file (.jsonl), a Parquet file (.parquet) "
                    "or a directory saved by datasets' save_to_disk; rename it or convert it")


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def rows(path: Path, shape: str) -> Iterator[Row]:
    """The rows of `path`; `shape` is the JSON of a valid row, for the error that needs it."""
    kind = kind_of(path)
    if kind == "jsonl":
        yield from _jsonl(path, shape)
        return
    for row in (_parquet(path) if kind == "parquet" else _saved_dataset(path)):
        if not isinstance(row.value, dict):
            raise DataError(f"{row.where}: not a row of columns; each row must look like {shape}")
        yield row


def _jsonl(path: Path, shape: str) -> Iterator[Row]:
    skipped = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            if not raw.strip():
                skipped += len(raw)
                continue
            try:
                value = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                "save the file as UTF-8") from None
            except ValueError as exc:
                raise DataError(f"{where}: not JSON ({getattr(exc, 'msg', exc)}, column "
                                f"{getattr(exc, 'colno', '?')}); each line must be one JSON "
                                f"object, like {shape}") from None
            if not isinstance(value, dict):
                raise DataError(f"{where}: a JSON {type(value).__name__}, not an object; each "
                                f"line must be one JSON object, like {shape}")
            yield Row(value, where, len(raw) + skipped)
            skipped = 0


def _parquet(path: Path) -> Iterator[Row]:
    pq = _optional("pyarrow.parquet", "pyarrow", path)
    import pyarrow

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{path} could not be read as Parquet ({exc}); write it again, or "
                        "give the rows as JSON Lines") from None
    share = path.stat().st_size / max(1, parquet.metadata.num_rows)
    n = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH):
        for value in batch.to_pylist():
            n += 1
            yield Row(value, f"{path} row {n}", share)


def _saved_dataset(path: Path) -> Iterator[Row]:
    datasets = _optional("datasets", "datasets", path)
    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path} is not a directory written by datasets' save_to_disk ({exc}); "
                        "give a .jsonl or .parquet file, or such a directory") from None
    if isinstance(data, datasets.DatasetDict):
        raise DataError(f"{path} holds several splits ({', '.join(data)}); give one split's "
                        f"directory, e.g. {path / next(iter(data))}")
    share = size_of(path) / max(1, len(data))
    for n, value in enumerate(data, 1):
        yield Row(value, f"{path} row {n}", share)


def _optional(module: str, package: str, path: Path) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading {path} needs {package}, which is not installed in "
                        f"{sys.executable}: pip install 'telepathy[datasets]' (exact versions: "
                        "requirements.lock)") from None
