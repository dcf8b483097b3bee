"""`telepathy data prepare` (`python -m telepathy.data prepare`): local text files through a local
Hugging Face tokenizer into a token file the trainer reads as it is.

    telepathy data prepare --tokenizer tokenizers/mine --out data/corpus.bin books/*.txt
    # then: --set data.path=data/corpus.bin (data.dtype and model.vocab_size as the sidecar says)

Writes FILE (raw uint16 or uint32 tokens, EOS after every document) and FILE.json (dtype, vocab
size, token count, tokenizer, SHA-256 of the tokens). Exit status: 0 written, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..core import exits, logs
from ..core.errors import TelepathyError

log = logging.getLogger("telepathy.data")


def main(argv: list[str] | None = None) -> int:
    logs.configure(0)
    p = argparse.ArgumentParser(prog="telepathy data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize text files into a token file")
    prep.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer directory")
    prep.add_argument("--out", required=True, help="the token file to write (e.g. data/train.bin)")
    prep.add_argument("--eos-id", type=int, help="the document separator (default: the "
                                                "tokenizer's EOS token)")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.add_argument("texts", nargs="+", help="text files, one document each")
    args = p.parse_args(argv)
    from .prepare import prepare

    try:
        meta = prepare(args.tokenizer, args.out, args.texts, args.eos_id, progress=not args.quiet)
    except TelepathyError as exc:
        log.error("%s", exc)
        return exits.BAD_INPUT
    except OSError as exc:  # disk full, unreadable file: nothing half-written is left
        log.error("writing %s failed: %s", args.out, exc)
        return exits.FAILED
    print(json.dumps({k: meta[k] for k in ("dtype", "vocab_size", "tokens", "documents",
                                           "tokenizer", "sha256")}, indent=1))
    print(f"wrote {meta['tokens']:,} tokens of {meta['documents']} document(s) to {args.out}; "
          f"train with --set data.path={args.out} --set data.dtype={meta['dtype']} "
          f"(model.vocab_size >= {meta['vocab_size']})", file=sys.stderr)
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
