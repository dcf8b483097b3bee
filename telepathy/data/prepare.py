"""Tokenize local text files with a local Hugging Face tokenizer into one token file.

Each input file is a document; EOS goes after every document. The text is read in blocks of
whole lines (a line longer than a block is cut), encoded, and appended to the token file as it
goes, hashed on the way: memory holds one or two blocks, never the corpus. Blocks are encoded
one by one, so where a block starts a tokenizer may split differently than it would inside one
long string (byte-level BPE decodes back to the same text; a SentencePiece tokenizer that
prepends a space marks each block start); a block is 1 MiB of text. The old sidecar is removed
first and the new one written last, so a token file never stands beside a sidecar of other
tokens. Output: raw tokens of `uint16` (when the vocabulary fits) or `uint32`, the layout
nanoGPT's prepare.py writes, which the trainer reads as it is (`data.path`, `data.dtype`).
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
                block += f.readline(BLOCK_CHARS)  # to the end of the line, or one block more
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
    if not 0 <= eos < vocab:
        raise DataError(f"--eos-id {eos} is not a token of the tokenizer (ids 0-{vocab - 1})")
    sources = [Path(t) for t in texts]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise DataError(f"no such text file: {', '.join(missing)}")
    dtype = np.dtype(dtype_for(vocab))
    out = Path(out)
    if out.suffix == ".npy":
        raise DataError(f"--out {out}: a prepared file holds raw tokens, not .npy; name it .bin")
    if any(out.absolute() == s.absolute() for s in sources):
        raise DataError(f"--out {out} is one of the text files; write the tokens elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    digest, count = hashlib.sha256(), 0
    total = sum(s.stat().st_size for s in sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    sidecar_path(out).unlink(missing_ok=True)  # never old metadata beside new tokens
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
            "tokenizer_sha256": tokenizer_digest(tokenizer_dir),
            "sources": [str(s) for s in sources], "sha256": digest.hexdigest(),
            "seconds": round(time.time() - started, 3)}
    write_atomic(sidecar_path(out), (json.dumps(meta, indent=1) + "\n").encode())
    return meta


def tokenizer_digest(tokenizer_dir: str | Path) -> str | None:
    """Names the tokenizer's content (its tokenizer.json), so a changed one is noticed."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _write(f, digest, ids: list[int], dtype: np.dtype) -> int:
    data = np.asarray(ids, dtype=dtype).tobytes()
    f.write(data)
    digest.update(data)
    return len(ids)
