"""LatentWire's bridge: one frozen causal LM (the source, a Llama-family model) reads a text, and
a small trained bridge turns its last hidden states into a few soft tokens that a second frozen
causal LM (the target, a Qwen2-family model, with its own tokenizer) reads in front of its own
token embeddings. Only the bridge trains; the loss is the target's language-model loss on its
tokens, each pair weighing the same.

telepathy builds it with `build(options)` (`model.module: bridge_model:build`) and calls
`forward(**batch)` with the samples of `bridge_data.pairs`; nothing here knows of ranks,
checkpoints or resumes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


class CrossAttention(nn.Module):
    """`soft_tokens` learned queries attend to the projected source states (one layer of
    multi-head attention, written with Linear layers: ZeRO-3 gathers each module's own
    parameters when it runs, so every weight is a module's, not reached from another's)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, queries: torch.Tensor, states: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        b, n, w = queries.shape
        split = lambda x: x.view(b, -1, self.heads, w // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(queries)), split(self.k(states)), split(self.v(states))
        keep = mask[:, None, None, :].bool()
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.out(attended.transpose(1, 2).reshape(b, n, w))


class Bridge(nn.Module):
    def __init__(self, source: nn.Module, target: nn.Module, soft_tokens: int, heads: int):
        super().__init__()
        self.source = source
        self.target = target
        width = target.config.hidden_size
        self.project = nn.Linear(source.config.hidden_size, width)
        self.attend = CrossAttention(width, heads)
        self.norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(soft_tokens, width) / math.sqrt(width))
        self.scale = nn.Parameter(torch.ones(1))
        for frozen in (self.source, self.target):
            frozen.requires_grad_(False)

    def soft_tokens(self, src_ids: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            states = self.source(input_ids=src_ids, attention_mask=src_mask,
                                 output_hidden_states=True).hidden_states[-1]
        queries = self.queries.expand(src_ids.shape[0], -1, -1)
        states = self.project(states.to(self.project.weight.dtype))
        return self.norm(queries + self.attend(queries, states, src_mask)) * self.scale

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor, tgt_ids: torch.Tensor,
                tgt_mask: torch.Tensor, tgt_labels: torch.Tensor, **unused):
        soft = self.soft_tokens(src_ids, src_mask)
        embeds = self.target.get_input_embeddings()(tgt_ids)
        b, k = soft.shape[:2]
        inputs = torch.cat([soft.to(embeds.dtype), embeds], dim=1)
        mask = torch.cat([tgt_mask.new_ones(b, k), tgt_mask], dim=1)
        labels = torch.cat([tgt_labels.new_full((b, k), IGNORE), tgt_labels], dim=1)
        logits = self.target(inputs_embeds=inputs, attention_mask=mask, use_cache=False).logits
        return per_pair_loss(logits, labels)


def per_pair_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over the pairs of each pair's mean next-token loss: every pair weighs the same,
    however many tokens it has. (A mean over all the tokens of a micro-batch, as a Hugging Face
    model's own `labels` loss is, weighs a pair by its length within its micro-batch: the loss
    then depends on how the pairs fall into micro-batches, that is on the GPU count.)"""
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                             ignore_index=IGNORE, reduction="none")
    counted = (targets != IGNORE).sum(dim=1).clamp(min=1)
    return (losses.sum(dim=1) / counted).mean()


def frozen_lm(path: str) -> nn.Module:
    """The pretrained causal LM at `path`, for inference. On the meta device (where telepathy's
    planner counts the module's parameters without reading a weight) only its shape is built:
    `from_pretrained` refuses to run there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if torch.get_default_device().type == "meta":
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path,
                                                                           local_files_only=True))
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    model.config.use_cache = False
    return model.eval()


def build(options: dict) -> Bridge:
    """options: source, target (local model directories), soft_tokens (default 8), heads
    (default 4; must divide the target's hidden size)."""
    return Bridge(frozen_lm(options["source"]), frozen_lm(options["target"]),
                  int(options.get("soft_tokens", 8)), int(options.get("heads", 4)))
