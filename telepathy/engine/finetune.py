"""What trains in a fine-tuning run: LoRA adapters (through peft) and the parameters that
`model.trainable` names; everything else is frozen (`requires_grad=False`).

Names are those of `named_parameters()` on the model as transformers builds it, before peft
wraps it: `canonical` strips peft's `base_model.model.` prefix and `.base_layer` infix, so a
glob means the same parameter with LoRA on or off.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch

from ..config import Config
from ..core.errors import ConfigError

ATTENTION_PROJECTIONS = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                     "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "starcoder2",
                     "smollm3"),
                    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj"]),
    "phi3": ["self_attn.qkv_proj", "self_attn.o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "gpt_neox": ["attention.query_key_value", "attention.dense"],
    "falcon": ["self_attention.query_key_value", "self_attention.dense"],
}
"""LoRA's default targets per model_type: every attention projection (q, k, v, output). peft
matches a target against the end of a module's name."""

PEFT_PREFIX = "base_model.model."


def canonical(name: str) -> str:
    """A parameter's name on the model before peft wrapped it."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


def is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_targets(cfg: Config, model_type: str) -> list[str]:
    """The modules that get adapters: model.lora.target_modules, else the attention projections
    of the architecture (telepathy's table, then peft's own)."""
    if cfg.model.lora.target_modules:
        return list(cfg.model.lora.target_modules)
    if model_type in ATTENTION_PROJECTIONS:
        return ATTENTION_PROJECTIONS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

    if model_type in peft_map:
        return list(peft_map[model_type])
    raise ConfigError(f"model.lora.target_modules is not set and telepathy does not know the "
                      f"attention projections of model_type {model_type!r}; name them, e.g. "
                      "--set 'model.lora.target_modules=[q_proj, v_proj]' (print the model's "
                      "named_modules() to see them)")


def add_lora(model: Any, cfg: Config) -> Any:
    """The model with LoRA adapters (peft) on its targets; peft freezes everything else. peft
    initialises the adapters from torch's RNG, seeded by the caller: every rank and every start
    builds the same adapters."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.model.lora
    targets = lora_targets(cfg, model.config.model_type)
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(f"model.lora.target_modules: {', '.join(missing)} match no module of "
                          f"this {model.config.model_type} model; its modules include "
                          f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in names if n})[:20])}")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def freeze(model: Any, patterns: list[str] | None, lora: bool) -> None:
    """Set requires_grad: the LoRA adapters (when on) and the parameters `patterns` name train;
    with neither, everything trains. A glob that names nothing is an error that lists names."""
    if patterns is None:
        return
    named = [(canonical(n), p, is_lora(n)) for n, p in model.named_parameters()]
    unmatched = [g for g in patterns if not any(fnmatch.fnmatchcase(n, g) for n, _, _ in named)]
    if unmatched:
        examples = ", ".join(n for n, _, adapter in named[:6] if not adapter)
        raise ConfigError(f"model.trainable: {', '.join(unmatched)} match no parameter of the "
                          f"model; names look like {examples}")
    for name, param, adapter in named:
        param.requires_grad_((adapter and lora) or
                             any(fnmatch.fnmatchcase(name, g) for g in patterns))


def check_trains(model: Any, what: str) -> Any:
    """The model, if any of its parameters trains."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"{what}: every parameter is frozen (requires_grad=False), so nothing "
                          "would train; leave the trained part unfrozen, or name it in "
                          "model.trainable")
    return model


def prepare(model: Any, cfg: Config) -> Any:
    """The model as it trains: LoRA added (model.lora.r > 0), parameters frozen as configured."""
    lora = cfg.model.lora.r > 0
    if lora:
        model = add_lora(model, cfg)
    freeze(model, cfg.model.trainable, lora)
    return model


def fine_tuning(cfg: Config) -> bool:
    """Whether part of the model is frozen."""
    return cfg.model.lora.r > 0 or cfg.model.trainable is not None


def count(cfg: Config, model_config: Any) -> tuple[int, int]:
    """(all, trainable) parameters of the model a run trains, counted on the meta device: no
    memory, no weights read; tied weights once, LoRA's adapters included."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = prepare(AutoModelForCausalLM.from_config(model_config), cfg)
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
