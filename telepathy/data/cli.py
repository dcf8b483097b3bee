"""`telepathy data prepare` (`python -m telepathy.data prepare`): local text files, or
instruction data, through a local Hugging Face tokenizer into a file the trainer reads as it is.

    telepathy data prepare --tokenizer tokenizers/mine --out data/corpus.bin books/*.txt
    # then: --set data.path=data/corpus.bin (data.dtype and model.vocab_size as the sidecar says)
    telepathy data prepare --tokenizer tokenizers/mine --format chat --out data/sft.ex \\
        chats.jsonl more.parquet saved_dataset/
    telepathy data toy --out data/toy        # a toy chat set and tokenizer, made here

`--format text` (the default) writes FILE (raw uint16 or uint32 tokens, EOS after every
document); `chat` and `prompt-completion` write FILE (the examples' tokens and loss masks, one
safetensors file that describes itself). Both write the sidecar FILE.json last. Exit status:
0 written, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..core import exits, logs
from ..core.errors import TelepathyError

log = logging.getLogger("telepathy.data")

FORMATS = ("text", "chat", "prompt-completion")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="telepathy data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize text or instruction data into a file")
    prep.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer directory")
    prep.add_argument("--out", required=True, help="the file to write (e.g. data/train.bin)")
    prep.add_argument("--format", default="text", choices=FORMATS,
                      help="text: documents (default); chat: rows of {\"messages\": [...]}; "
                           "prompt-completion: {\"prompt\", \"completion\"} rows")
    prep.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template to use "
                      "instead of the tokenizer's own (needed when it has none)")
    prep.add_argument("--train-on-prompt", action="store_true",
                      help="count every token in the loss, not the answers only")
    prep.add_argument("--max-len", type=int, metavar="N", help="cut longer examples to N tokens")
    prep.add_argument("--drop-long", action="store_true",
                      help="drop examples longer than --max-len instead of cutting them")
    prep.add_argument("--eos-id", type=int, help="--format text: the document separator "
                                                "(default: the tokenizer's EOS token)")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="text files (one document each); or .jsonl, .parquet files and "
                           "directories saved by datasets' save_to_disk")
    toy = sub.add_parser("toy", help="a toy chat data set and a tokenizer with a chat template")
    toy.add_argument("--out", required=True, help="the directory to write")
    toy.add_argument("--style", default="chatml", choices=("chatml", "llama3"),
                     help="the tokenizer's special tokens and chat template")
    toy.add_argument("--train", type=int, default=2000, help="chats in train.jsonl")
    toy.add_argument("--val", type=int, default=200, help="chats in val.jsonl")
    toy.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    logs.configure(0)
    p = parser()
    args = p.parse_args(argv)
    if args.command == "prepare":
        check_flags(p, args)
    try:
        return toy(args) if args.command == "toy" else prepare(args)
    except TelepathyError as exc:
        log.error("%s", exc)
        return exits.BAD_INPUT
    except OSError as exc:  # disk full, unreadable file: nothing half-written is left
        log.error("writing %s failed: %s", args.out, exc)
        return exits.FAILED


def check_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.format == "text":
        given = [flag for flag, value in (("--chat-template", args.chat_template),
                                          ("--train-on-prompt", args.train_on_prompt),
                                          ("--max-len", args.max_len),
                                          ("--drop-long", args.drop_long)) if value]
        if given:
            p.error(f"{', '.join(given)}: for --format chat or prompt-completion, not text")
    elif args.eos_id is not None:
        p.error("--eos-id: for --format text (examples end as their template says)")
    if args.drop_long and args.max_len is None:
        p.error("--drop-long needs --max-len N (the longest example kept)")


def prepare(args: argparse.Namespace) -> int:
    if args.format == "text":
        from .prepare import prepare

        meta = prepare(args.tokenizer, args.out, args.inputs, args.eos_id,
                       progress=not args.quiet)
        print(json.dumps({k: meta[k] for k in ("dtype", "vocab_size", "tokens", "documents",
                                               "tokenizer", "sha256")}, indent=1))
        print(f"wrote {meta['tokens']:,} tokens of {meta['documents']} document(s) to "
              f"{args.out}; train with --set data.path={args.out} --set data.dtype="
              f"{meta['dtype']} (model.vocab_size >= {meta['vocab_size']})", file=sys.stderr)
        return exits.OK
    from .prepare import prepare_examples

    meta = prepare_examples(args.tokenizer, args.out, args.inputs, args.format,
                            args.chat_template, args.train_on_prompt, args.max_len,
                            args.drop_long, progress=not args.quiet)
    print(json.dumps({k: meta[k] for k in ("example_format", "dtype", "vocab_size", "examples",
                                           "tokens", "loss_tokens", "truncated", "dropped",
                                           "tokenizer", "sha256")}, indent=1))
    print(f"wrote {meta['examples']:,} examples ({meta['tokens']:,} tokens, "
          f"{meta['loss_tokens']:,} in the loss) to {args.out}; train with --set data.path="
          f"{args.out} (model.vocab_size >= {meta['vocab_size']})", file=sys.stderr)
    return exits.OK


def toy(args: argparse.Namespace) -> int:
    from .toy import make_toy

    made = make_toy(args.out, args.style, args.train, args.val, args.seed)
    print(json.dumps(made, indent=1))
    print(f"then: telepathy data prepare --tokenizer {made['tokenizer']} --format chat --out "
          f"{args.out}/train.ex {made['train_path']}", file=sys.stderr)
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
