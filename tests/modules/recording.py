"""Test modules for model.module and data.module (imported from this directory through the
config's code_path): the bridge example recording the sample indices each forward receives,
and modules that fail in each way a user's can."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def bridge(options: dict) -> nn.Module:
    """examples/bridge's Bridge; with options["record"], each forward appends the indices of
    its samples to RECORD/rank<R>.jsonl (not on the meta device: telepathy's check)."""
    import bridge_model

    model = bridge_model.build(options)
    record = options.get("record")
    if record:
        forward = model.forward

        def recorded(**batch):
            index = batch["index"]
            if index.device.type != "meta":
                import torch.distributed as dist

                rank = dist.get_rank() if dist.is_initialized() else 0
                Path(record).mkdir(parents=True, exist_ok=True)
                with open(Path(record) / f"rank{rank}.jsonl", "a") as f:
                    f.write(json.dumps(index.tolist()) + "\n")
            return forward(**batch)

        model.forward = recorded
    return model


class Tiny(nn.Module):
    """A linear model of token ids; what `forward` returns is chosen by `returns`."""

    def __init__(self, returns: str = "loss"):
        super().__init__()
        self.embed = nn.Embedding(512, 8)
        self.head = nn.Linear(8, 512)
        self.returns = returns

    def forward(self, input_ids, labels=None, **unused):
        logits = self.head(self.embed(input_ids))
        if self.returns == "logits":
            return logits
        if self.returns == "dict":
            return {"logits": logits}
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                           ignore_index=-100)
        return loss


def tiny(options: dict) -> nn.Module:
    return Tiny(options.get("returns", "loss"))


def raises(options: dict) -> nn.Module:
    width = options.get("width", 0)
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    return Tiny()


def scalar(options: dict) -> nn.Module:
    model = Tiny()
    model.gain = nn.Parameter(torch.tensor(1.0))
    return model


class Ragged(torch.utils.data.Dataset):
    """Samples of 16 tokens, but sample `odd` has 15."""

    def __init__(self, odd: int):
        self.odd = odd

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        n = 15 if i == self.odd else 16
        ids = torch.arange(i, i + n) % 512
        return {"input_ids": ids, "labels": ids}


def ragged(options: dict) -> Ragged:
    return Ragged(int(options.get("odd", 63)))


def eager_bridge(options: dict) -> nn.Module:
    """The bridge with its frozen models loaded by from_pretrained alone, which refuses the meta
    device: the planner cannot count it before a start does."""
    import bridge_model
    from transformers import AutoModelForCausalLM

    load = lambda path: AutoModelForCausalLM.from_pretrained(path, local_files_only=True)  # noqa: E731
    return bridge_model.Bridge(load(options["source"]), load(options["target"]), 4, 4)
