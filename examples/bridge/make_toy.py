"""A toy version of the bridge's world, made here with nothing downloaded: two tiny causal LMs
with their own tokenizers (a Llama-family source with Llama 3's tokenizer layout, a
Qwen2-family target with ChatML's) saved as local model directories, and pairs of texts (a
question for the source, its answer for the target).

    python examples/bridge/make_toy.py --out runs/bridge-toy

The real bridge points the same options at real checkpoints (e.g. Llama-3.1-8B and
Qwen2.5-7B directories) and a real pairs file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def save_model(out: Path, family: str, style: str, seed: int, width: int = 64) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from telepathy.data.toy import make_tokenizer

    make_tokenizer(out, style)
    fields = dict(hidden_size=width, intermediate_size=width * 2 + width // 2, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                  max_position_embeddings=128, tie_word_embeddings=False)
    config = LlamaConfig(**fields) if family == "llama" else Qwen2Config(**fields)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def make(out: str | Path, pairs: int = 512, seed: int = 0) -> dict[str, str]:
    """OUT/source (Llama), OUT/target (Qwen2), OUT/pairs.jsonl; their paths."""
    from telepathy.data.toy import toy_chats

    out = Path(out)
    source = save_model(out / "source", "llama", "llama3", seed + 1)
    target = save_model(out / "target", "qwen2", "chatml", seed + 2, width=48)
    rows = [{"source": chat["messages"][-2]["content"], "target": chat["messages"][-1]["content"]}
            for chat in toy_chats(pairs, seed, max_turns=1, system_share=0.0, long_share=0.0)]
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"source": str(source), "target": str(target), "pairs": str(out / "pairs.jsonl")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bridge-toy", help="directory to write (default: %(default)s)")
    p.add_argument("--pairs", type=int, default=512)
    args = p.parse_args(argv)
    print(json.dumps(make(args.out, args.pairs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
