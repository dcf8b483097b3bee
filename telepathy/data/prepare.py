"""Tokenize local text files with a local Hugging Face tokenizer into one token file
(`prepare`), or instruction data into a file of examples with loss masks (`prepare_examples`).

Each input file is a document; EOS goes after every document. The text is read in blocks of
whole lines (a line longer than a block is cut), encoded, and appended to the token file as it
goes, hashed on the way: memory holds one or two blocks, never the corpus. Blocks are encoded
one by one, so where a block starts a tokenizer may split differently than it would inside one
long string (byte-level BPE decodes back to the same text; a SentencePiece tokenizer that
prepends a space marks each block start); a block is 1 MiB of text. The old sidecar is removed
first and the new one written last, so a token file never stands beside a sidecar of other
tokens. Output: raw tokens of `uint16` (when the vocabulary fits) or `uint32`, the layout
nanoGPT's prepare.py writes, which the trainer reads as it is (`data.path`, `data.dtype`).

Instruction data (chats, prompt-completion rows; `chat` encodes a row, `sources` reads them) is
streamed row by row into an `exfile.ExamplesWriter`: an example longer than `max_len` is cut
(or dropped), a bad row refuses the whole run with its file and line, and only a run that got
to the end replaces FILE (an older one stays until then) and writes its sidecar.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DataError
from ..core.fsutil import fsync_dir, write_atomic
from . import chat, sources
from .exfile import ExamplesWriter
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


def prepare_examples(tokenizer_dir: str | Path, out: str | Path, inputs: Iterable[str | Path],
                     fmt: str, chat_template: str | Path | None = None,
                     train_on_prompt: bool = False, max_len: int | None = None,
                     drop_long: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write the file of examples (`exfile`) and its sidecar; returns the sidecar."""
    started = time.time()
    if fmt not in chat.FORMATS:
        raise DataError(f"--format {fmt!r}: examples are one of {', '.join(chat.FORMATS)}")
    if max_len is not None and max_len < 2:
        raise DataError(f"--max-len {max_len}: an example needs at least 2 tokens")
    tokenizer = load_tokenizer(tokenizer_dir)
    template = chat.resolve_template(tokenizer, chat_template, tokenizer_dir, fmt == "chat")
    encoder = chat.Encoder(tokenizer, template, train_on_prompt)
    paths, out = check_inputs(inputs, out)
    cut = Cut(max_len, drop_long)
    with ExamplesWriter(out, dtype_for(len(tokenizer))) as writer:
        write_examples(writer, encoder, fmt, paths, cut, progress)
        sidecar_path(out).unlink(missing_ok=True)  # never old metadata beside new examples
        meta = writer.finish({
            "example_format": fmt, **tokenizer_meta(tokenizer, tokenizer_dir),
            "chat_template_sha256": template.sha256 if encoder.used_template else None,
            "train_on_prompt": train_on_prompt, "max_len": max_len,
            "truncated": cut.truncated, "dropped": cut.dropped,
            "sources": [str(p) for p in paths], "seconds": round(time.time() - started, 3)})
    fsync_dir(out.parent)
    write_atomic(sidecar_path(out), (json.dumps(meta, indent=1) + "\n").encode())
    return meta


def check_inputs(inputs: Iterable[str | Path], out: str | Path) -> tuple[list[Path], Path]:
    """Every input is readable as instruction data, and none is the output."""
    paths, out = [Path(p) for p in inputs], Path(out)
    for path in paths:
        sources.kind_of(path)
        if path.absolute() == out.absolute():
            raise DataError(f"--out {out} is one of the inputs; write the examples elsewhere")
    return paths, out


def write_examples(writer: ExamplesWriter, encoder: chat.Encoder, fmt: str, paths: list[Path],
                   cut: Cut, progress: bool) -> None:
    """Every row of every input, encoded, cut and appended; a bad row names where it is."""
    from tqdm import tqdm

    with tqdm(total=sum(map(sources.size_of, paths)), unit="B", unit_scale=True,
              desc="tokenizing", disable=not progress) as bar:
        for path in paths:
            for row in sources.rows(path, chat.SHAPES[fmt]):
                try:
                    ids, mask = encoder.example(fmt, row.value)
                except DataError as exc:
                    raise DataError(f"{row.where}: {exc}") from None
                kept = cut(ids, mask)
                if kept is not None:
                    writer.add(*kept)
                bar.update(row.size)
    if writer.examples == 0:
        raise DataError(f"no example to write from {', '.join(map(str, paths))} (empty, or "
                        f"every example dropped: {cut.dropped}); check the inputs and --max-len")


@dataclass
class Cut:
    """Examples longer than `max_len` tokens: cut to it (`truncated`), or left out (`dropped`)
    with `drop_long`, or when the cut leaves no token in the loss."""

    max_len: int | None
    drop_long: bool
    truncated: int = 0
    dropped: int = 0

    def __call__(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int]] | None:
        n = self.max_len
        if n is None or len(ids) <= n:
            return ids, mask
        if self.drop_long or not any(mask[1:n]):
            self.dropped += 1
            return None
        self.truncated += 1
        return ids[:n], mask[:n]


def tokenizer_meta(tokenizer: Any, tokenizer_dir: str | Path) -> dict[str, Any]:
    """What the sidecar says of the tokenizer: its vocabulary, EOS, padding (EOS where it has
    none), name, directory and content."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    return {"vocab_size": len(tokenizer), "eos_token_id": eos,
            "pad_token_id": eos if pad is None else pad,
            "tokenizer": getattr(tokenizer, "name_or_path", str(tokenizer_dir)),
            "tokenizer_dir": str(Path(tokenizer_dir).absolute()),
            "tokenizer_sha256": tokenizer_digest(tokenizer_dir)}


def tokenizer_digest(tokenizer_dir: str | Path) -> str | None:
    """Names the tokenizer's content (its tokenizer.json), so a changed one is noticed."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _write(f, digest, ids: list[int], dtype: np.dtype) -> int:
    data = np.asarray(ids, dtype=dtype).tobytes()
    f.write(data)
    digest.update(data)
    return len(ids)
