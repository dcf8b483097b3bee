"""What a prepared token file holds: its JSON sidecar (`<token file>.json`), written by
`telepathy data prepare`, checked by the trainer against the config before any distributed
work, and recorded in every checkpoint's state.

Fields: format, dtype, vocab_size, tokens, documents, eos_token_id, tokenizer (its name or
path), tokenizer_dir (a copy is kept in the run directory), sources, sha256 (of the token bytes).
A file of examples (`exfile.FORMAT`, `--format chat|prompt-completion`) has the same sidecar
as its own header holds: format, example_format, dtype, vocab_size, examples, tokens,
loss_tokens, eos_token_id, pad_token_id, tokenizer, tokenizer_dir, tokenizer_sha256,
chat_template_sha256, train_on_prompt, max_len, truncated, dropped, sources, seconds, sha256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config.schema import Config
from ..core.errors import DataError
from . import exfile

FORMAT = "telepathy-tokens/1"


def sidecar_path(tokens: str | Path) -> Path:
    return Path(f"{tokens}.json")


def dtype_for(vocab_size: int) -> str:
    """uint16 when every id fits (as nanoGPT writes), else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def read(tokens: str | Path) -> dict[str, Any] | None:
    """The sidecar of a token file; None when it has none (a file prepared elsewhere)."""
    path = sidecar_path(tokens)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); run telepathy data prepare again, "
                        "or delete it to train on the token file without its checks") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, exfile.FORMAT):
        raise DataError(f"{path} is not a telepathy sidecar (format {FORMAT} or "
                        f"{exfile.FORMAT}); delete it or prepare the data again")
    return meta


def check(cfg: Config, meta: dict[str, Any], model_vocab: int | None = None) -> None:
    """The config must read the file as it was written, with room for every token id in the
    model (`model_vocab`: a pretrained model's own vocabulary; default model.vocab_size), and
    the file must still hold what its sidecar says (its size; the full SHA-256 is not re-read).
    A file of examples describes itself (its dtype and size are in its header): only its
    vocabulary is checked."""
    path = cfg.data.path
    if meta["format"] != exfile.FORMAT:
        check_raw(path, meta, cfg.data.dtype)
    vocab = cfg.model.vocab_size if model_vocab is None else model_vocab
    where = "model.vocab_size" if model_vocab is None else \
        f"the vocabulary of model.pretrained_path={cfg.model.pretrained_path!r}"
    if meta["vocab_size"] > vocab:
        fix = (f"set model.vocab_size to at least {meta['vocab_size']}" if model_vocab is None
               else "prepare the data with the model's own tokenizer")
        raise DataError(f"{path} was tokenized with {meta['tokenizer']!r}, a vocabulary of "
                        f"{meta['vocab_size']} tokens, but {where} is {vocab}; {fix}")


def check_raw(path: str, meta: dict[str, Any], dtype: str) -> None:
    """A raw token file still has the size its sidecar says, and data.dtype reads it."""
    itemsize = 2 if meta["dtype"] == "uint16" else 4
    size = Path(path).stat().st_size if Path(path).is_file() else None
    if size is not None and size != meta["tokens"] * itemsize:
        raise DataError(f"{path} has {size} bytes but its sidecar says {meta['tokens']} "
                        f"{meta['dtype']} tokens ({meta['tokens'] * itemsize} bytes): the file "
                        "changed since it was prepared; run telepathy data prepare again")
    if meta["dtype"] != dtype:
        raise DataError(f"{path} holds {meta['dtype']} tokens (its sidecar says so) but "
                        f"data.dtype={dtype!r}; set data.dtype={meta['dtype']}")
