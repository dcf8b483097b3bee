"""Build the model, its optimizer and LR schedule, and the DeepSpeed ZeRO-3 engine.

The DeepSpeed config itself is plain data (`ds_config`); building goes through DeepSpeed's and
transformers' public APIs only (internals are in `adapter.py`).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

from ..config import Config
from . import adapter, finetune
from .schedule import lr_factor

log = logging.getLogger(__name__)


class Layout(Protocol):
    """How the global batch is split (telepathy.plan.placement.Layout)."""

    micro_batch: int
    accum: int

    @property
    def global_batch(self) -> int: ...


def precision(cfg: Config, cuda: bool) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]


def ds_config(cfg: Config, layout: Layout, dtype: torch.dtype, offload: str = "none",
              load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed configuration for ZeRO stage 3 with a client optimizer and scheduler.

    `offload` (from the planner) moves optimizer, or optimizer and parameter, states to host
    memory; `load_universal` reads a checkpoint converted for another world size.
    """
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    if offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.accum,
        "gradient_clipping": cfg.train.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": zero,
        "checkpoint": {"load_universal": load_universal},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


DEEPSPEED_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default `reduce_bucket_size` (elements): ZeRO-3 allocates the bucket whole."""


def reduce_bucket_size(parameters: int) -> int:
    """The reduce bucket for a model of `parameters` elements: DeepSpeed's default, but never
    larger than the model. A bucket that holds every gradient groups them exactly as the
    default does (one bucket), so the losses are the same bit for bit; what goes is the unused
    rest, which ZeRO-3 allocates whole (2 GB in fp32), and which PyTorch's deterministic mode
    fills with NaN at every start: 5.8 s of a tiny model's 10 s start-up on CPU."""
    return max(1, min(DEEPSPEED_REDUCE_BUCKET, parameters))


def model_config(cfg: Config, dtype: torch.dtype):
    """The transformers config of the model the fields of `model` describe (`model.arch`, any
    of schema.ARCHS), without dropout, with untied embeddings."""
    from transformers import AutoConfig

    m = cfg.model
    fields = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                  intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                  head_dim=m.hidden_size // m.num_heads, max_position_embeddings=m.max_seq_len,
                  rope_theta=m.rope_theta, tie_word_embeddings=False, attention_dropout=0.0,
                  use_cache=False, dtype=dtype, pad_token_id=None,
                  bos_token_id=None, eos_token_id=None)
    if m.arch == "gpt2":  # its own names for the MLP width and the dropouts
        fields.update(n_inner=m.intermediate_size, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0)
    if m.arch == "gpt_neox":
        fields.update(hidden_dropout=0.0, rotary_pct=1.0)
    return AutoConfig.for_model(m.arch, **fields)


def import_libraries():
    """What `build_engine` needs of DeepSpeed and transformers (most of a rank's start-up
    imports): deepspeed, AutoModelForCausalLM, HfDeepSpeedConfig."""
    deepspeed = adapter.import_deepspeed()
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    return deepspeed, AutoModelForCausalLM, HfDeepSpeedConfig


def make_model(cfg: Config, dtype: torch.dtype) -> torch.nn.Module:
    """The model as it trains, built while HfDeepSpeedConfig is alive (ZeRO-3 partitions what
    transformers loads as it loads it): model.module's, or a causal LM from model.pretrained_path
    or the model fields, with LoRA and the frozen parameters as configured."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.train.seed)
    if cfg.model.module:
        from .usercode import build_module

        model = build_module(cfg)
        finetune.freeze(model, cfg.model.trainable, lora=False)
        return finetune.check_trains(model, f"model.module={cfg.model.module!r}")
    if cfg.model.pretrained_path:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.pretrained_path, dtype=dtype,
                                                     local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_config(model_config(cfg, dtype), dtype=dtype)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model = finetune.prepare(model, cfg)
    if cfg.model.gradient_checkpointing and finetune.fine_tuning(cfg):
        model.enable_input_require_grads()  # a frozen embedding: recompute still needs a grad path
    # from_pretrained hands the model over in eval mode: train in training mode, as transformers'
    # Trainer does (dropout on, gradient checkpointing in effect); evaluations restore it. A
    # module of the user's keeps the modes its FUNC gave its parts.
    return model.train()


def build_engine(cfg: Config, layout: Layout, cuda: bool, offload: str = "none",
                 load_universal: bool = False):
    """Model + AdamW + LambdaLR schedule wrapped in a ZeRO-3 engine."""
    deepspeed, _, HfDeepSpeedConfig = import_libraries()

    dtype = precision(cfg, cuda)
    conf = ds_config(cfg, layout, dtype, offload if cuda else "none", load_universal)
    hf_ds = HfDeepSpeedConfig(conf)  # must stay alive while the model is built: enables zero.Init
    model = make_model(cfg, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    conf["zero_optimization"]["reduce_bucket_size"] = reduce_bucket_size(
        sum(adapter.full_shape(p).numel() for p in trainable))
    decay, no_decay = [], []
    for p in trainable:
        (decay if len(adapter.full_shape(p)) >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.train.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                                  eps=cfg.train.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda s: lr_factor(s, cfg.train))
    adapter.skip_muon_import()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=conf)
    del hf_ds
    return engine


def count_parameters(engine) -> int:
    return sum(adapter.numel(p) for p in engine.module.parameters())


def count_trainable(engine) -> int:
    return sum(adapter.numel(p) for p in engine.module.parameters() if p.requires_grad)


def has_frozen(engine) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())
