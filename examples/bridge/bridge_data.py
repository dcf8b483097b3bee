"""Pairs of texts read through both models' tokenizers: each sample is the source text as the
source model tokenizes it and the target text as the target model does, each padded to a fixed
length. A map-style dataset: telepathy chooses the order (and keeps it across resumes and GPU
counts); the samples depend on their index alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IGNORE = -100


def _tokenize(tokenizer, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(texts), length), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), length), dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = tokenizer(text, add_special_tokens=True)["input_ids"][:length]
        ids[i, :len(tokens)] = torch.tensor(tokens)
        mask[i, :len(tokens)] = 1
    return ids, mask


class Pairs(torch.utils.data.Dataset):
    def __init__(self, path: str | Path, source: str, target: str, source_len: int,
                 target_len: int):
        from transformers import AutoTokenizer

        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        self.src_ids, self.src_mask = _tokenize(
            AutoTokenizer.from_pretrained(source, local_files_only=True),
            [r["source"] for r in rows], source_len)
        target_tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
        eos = target_tokenizer.eos_token or ""
        self.tgt_ids, self.tgt_mask = _tokenize(
            target_tokenizer, [r["target"] + eos for r in rows], target_len)
        self.tgt_labels = self.tgt_ids.masked_fill(self.tgt_mask == 0, IGNORE)

    def __len__(self) -> int:
        return len(self.src_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"src_ids": self.src_ids[i], "src_mask": self.src_mask[i],
                "tgt_ids": self.tgt_ids[i], "tgt_mask": self.tgt_mask[i],
                "tgt_labels": self.tgt_labels[i], "index": torch.tensor(i)}


def pairs(options: dict) -> Pairs:
    """options: path (JSON Lines of {"source": ..., "target": ...}), source and target (the
    model directories whose tokenizers read them), source_len and target_len (tokens)."""
    return Pairs(options["path"], options["source"], options["target"],
                 int(options.get("source_len", 32)), int(options.get("target_len", 32)))
