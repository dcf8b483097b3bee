"""Tokenize local text files with a local Hugging Face tokenizer into one token file.

Each input file is a document; EOS goes after every document. The text is read in blocks of
whole lines, encoded, and appended to the token file as it goes (the corpus is never held in
memory, let alone twice), hashed on the way; the sidecar is written last. Output: raw tokens of
`uint16` (when the vocabulary fits) or `uint32`, the layout nanoGPT's prepare.py writes, which
the trainer reads as it is (`data.path`, `data.dtype`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DataError
from ..core.fsutil import fsync_dir, write_atomic
from .sidecar import FORMAT, dtype_for, sidecar_path

BLOCK_CHARS = 1 << 20
"""Text encoded at a time: whole lines up to about this many characters."""


def load_tokenizer(path: str | Path):
    """A local tokenizer directory (tokenizer.json and its config); nothing is downloaded."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"--tokenizer {str(path)!r} is not a directory; give a local Hugging Face "
                        "tokenizer directory (with tokenizer.json), nothing is downloaded")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"--tokenizer {str(path)!r} could not be loaded: {exc}") from None


def blocks(path: Path) -> Iterator[str]:
    """The text of a file in blocks of whole lines."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            block = f.read(BLOCK_CHARS)
            if not block:
                return
            if not block.endswith("\n"):
                block += f.readline()
            yield block


def prepare(tokenizer_dir: str | Path, out: str | Path, texts: Iterable[str | Path],
            eos_token_id: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the token file and its sidecar; returns the sidecar."""
    from tqdm import tqdm

    started = time.time()
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise DataError(f"the tokenizer in {tokenizer_dir} has no EOS token; give one with "
                        "--eos-id (the id that separates documents)")
    vocab = len(tokenizer)
    sources = [Path(t) for t in texts]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise DataError(f"no such text file: {', '.join(missing)}")
    dtype = np.dtype(dtype_for(vocab))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    digest, count = hashlib.sha256(), 0
    total = sum(s.stat().st_size for s in sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    try:
        with open(tmp, "wb") as f:
            for source in sources:
                for block in blocks(source):
                    ids = tokenizer(block, add_special_tokens=False)["input_ids"]
                    count += _write(f, digest, ids, dtype)
                    bar.update(len(block.encode("utf-8", errors="replace")))
                count += _write(f, digest, [eos], dtype)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    meta = {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab, "tokens": count,
            "documents": len(sources), "eos_token_id": int(eos),
            "tokenizer": getattr(tokenizer, "name_or_path", str(tokenizer_dir)),
            "tokenizer_dir": str(Path(tokenizer_dir).absolute()),
            "sources": [str(s) for s in sources], "sha256": digest.hexdigest(),
            "seconds": round(time.time() - started, 3)}
    write_atomic(sidecar_path(out), (json.dumps(meta, indent=1) + "\n").encode())
    return meta


def _write(f, digest, ids: list[int], dtype: np.dtype) -> int:
    data = np.asarray(ids, dtype=dtype).tobytes()
    f.write(data)
    digest.update(data)
    return len(ids)
