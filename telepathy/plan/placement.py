"""The placement planner: how a fixed global batch is split over the ranks (1-4 GPUs a node, on one
node or several). Pure functions.

`plan()` picks, for a world size, the largest allowed micro-batch that divides the per-rank
batch and fits the GPU's memory (the ZeRO-3 model of `memory.py`), offloading the optimizer (then
the parameters) only when no micro-batch fits without. `world * micro * accum == global batch`
always holds exactly, so the trajectory is the same on any GPU count up to reduction order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.schema import Config
from ..core.errors import ConfigError
from .memory import OFFLOADS, GiB, Memory, ModelShape, zero3_memory

MAX_GPUS = 4
"""GPUs of one node (one rank each); a job on several nodes has nodes x GPUs ranks."""


class PlanError(ConfigError):
    """No placement satisfies the request; the message says what would."""


@dataclass(frozen=True)
class Layout:
    """How the global batch is split: world * micro * accum == global_batch."""

    world_size: int
    micro_batch: int
    accum: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.accum


@dataclass(frozen=True)
class PlanRequest:
    gpus: int
    """Ranks (one per GPU): nodes x 1-4."""
    shape: ModelShape
    global_batch: int
    micro_sizes: tuple[int, ...]
    dtype_bytes: int
    """2 for bf16 training, 4 for fp32."""
    gpu_mem_gib: float | None = None
    """Memory of each GPU; None (CPU, or unknown) skips the memory check."""
    headroom: float = 0.9
    """Fraction of GPU memory a plan may use (the rest: CUDA context, fragmentation)."""
    allow_offload: bool = True
    allow_nearest_global_batch: bool = False
    max_micro: int | None = None
    """A cap on the micro-batch: one an out-of-memory error chose in an earlier allocation."""


@dataclass(frozen=True)
class Plan:
    layout: Layout
    offload: str
    memory: Memory
    notes: tuple[str, ...] = ()

    @property
    def global_batch(self) -> int:
        return self.layout.global_batch


def nearest_divisible(global_batch: int, world: int) -> tuple[int, int]:
    """The global batches closest below and above `global_batch` that `world` divides."""
    below = global_batch - global_batch % world
    return (below if below > 0 else world), below + world


def _global_batch(req: PlanRequest, world: int) -> tuple[int, tuple[str, ...]]:
    gb = req.global_batch
    if gb % world == 0:
        return gb, ()
    below, above = nearest_divisible(gb, world)
    nearest = below if gb - below <= above - gb else above
    if req.allow_nearest_global_batch:
        return nearest, (f"global batch {gb} -> {nearest}: {gb} does not divide over {world} "
                         "GPUs (placement.allow_nearest_global_batch)",)
    fits = [n for n in range(1, max(MAX_GPUS, world) + 1) if gb % n == 0]
    raise PlanError(
        f"train.global_batch={gb} does not divide over {world} GPUs (it divides over "
        f"{', '.join(map(str, fits))}); the nearest global batches that do are {below} and "
        f"{above}. Set train.global_batch to one of them, run on {fits[-1]} GPUs, or set "
        f"placement.allow_nearest_global_batch=true to train with {nearest} on {world} GPUs "
        "(a different trajectory)")


def plan(req: PlanRequest) -> Plan:
    """The placement for `req.gpus` GPUs (ranks, on any number of nodes), or a PlanError that
    says what would work."""
    if req.gpus < 1:
        raise PlanError(f"{req.gpus} GPUs requested: a run needs at least 1 rank (1-{MAX_GPUS} "
                        "GPUs per node, on one node or several)")
    world = req.gpus
    gb, notes = _global_batch(req, world)
    per_rank = gb // world
    micros = [m for m in sorted(set(req.micro_sizes), reverse=True) if per_rank % m == 0]
    if not micros:
        raise PlanError(f"no size in placement.micro_batch_sizes={list(req.micro_sizes)} divides "
                        f"the per-rank batch {per_rank} (= global batch {gb} / {world} ranks); "
                        "add 1 to the list")
    if req.max_micro is not None:
        capped = [m for m in micros if m <= req.max_micro] or micros[-1:]
        if capped[0] < micros[0]:
            notes += (f"micro-batch at most {capped[0]} (not {micros[0]}): an earlier allocation "
                      f"ran out of memory and carried micro-batch {req.max_micro}",)
        micros = capped
    limit = None if req.gpu_mem_gib is None else req.gpu_mem_gib * GiB * req.headroom
    offloads = OFFLOADS if req.allow_offload and limit is not None else OFFLOADS[:1]
    for offload in offloads:
        for micro in micros:
            memory = zero3_memory(req.shape, world, micro, req.dtype_bytes, offload)
            if limit is None or memory.peak <= limit:
                extra = (f"offload {offload}: no micro-batch fits {req.gpu_mem_gib:g} GiB "
                         "without it",) if offload != "none" else ()
                return Plan(Layout(world, micro, per_rank // micro), offload, memory,
                            notes + extra)
    smallest = zero3_memory(req.shape, world, micros[-1], req.dtype_bytes, offloads[-1])
    raise PlanError(
        f"nothing fits {world} GPU(s) of {req.gpu_mem_gib:g} GiB (using {req.headroom:.0%}): even "
        f"micro-batch {micros[-1]}{' with ' + offloads[-1] + ' offload' if len(offloads) > 1 else ''} "
        f"needs ~{smallest.peak_gib:.1f} GiB per GPU. Use more GPUs, add smaller sizes to "
        "placement.micro_batch_sizes, enable model.gradient_checkpointing, or shorten "
        "data.seq_len")


def smaller(layout: Layout, micro_sizes: tuple[int, ...] | list[int]) -> Layout | None:
    """The layout after an out-of-memory error: the largest allowed micro-batch at most half the
    current one that divides the per-rank batch, with accumulation raised to match. None if the
    micro-batch cannot shrink."""
    per_rank = layout.micro_batch * layout.accum
    for micro in sorted(set(micro_sizes), reverse=True):
        if micro <= layout.micro_batch // 2 and per_rank % micro == 0:
            return Layout(layout.world_size, micro, per_rank // micro)
    return None


def shape_of(cfg: Config, hf_config: dict | None = None, total: int | None = None,
             trainable: int | None = None) -> ModelShape:
    """What the memory model needs of the run's model: from the config.json of
    `model.pretrained_path` (`hf_config`, any causal LM: Llama's names or GPT-2's) or from the
    model fields; `total`/`trainable` as counted from the model itself (None: the formula)."""
    m = cfg.model
    if hf_config is None:
        return ModelShape(m.num_layers, m.hidden_size, m.intermediate_size, m.num_heads,
                          m.num_kv_heads, m.vocab_size, cfg.data.seq_len, m.gradient_checkpointing,
                          False, total, trainable)
    text = hf_config.get("text_config") or hf_config

    def first(*names, default=None):
        for name in names:
            if text.get(name) is not None:
                return text[name]
        if default is None:
            raise ConfigError(f"model.pretrained_path={m.pretrained_path!r}: its config.json has "
                              f"none of {', '.join(names)}; is it a causal language model?")
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", "num_heads")
    return ModelShape(first("num_hidden_layers", "n_layer", "num_layers"), hidden,
                      first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden), heads,
                      first("num_key_value_heads", "multi_query_group_num", default=heads),
                      first("vocab_size", "padded_vocab_size"), cfg.data.seq_len,
                      m.gradient_checkpointing, bool(text.get("tie_word_embeddings", False)),
                      total, trainable)


def request_for(cfg: Config, gpus: int, gpu_mem_gib: float | None,
                shape: ModelShape | None = None) -> PlanRequest:
    """The planner's input for a run config on `gpus` ranks; `gpu_mem_gib` None: on CPU.
    `shape`: the model's (shape_of), default from the model fields."""
    m = cfg.model
    shape = shape or shape_of(cfg)
    bf16 = m.dtype == "bfloat16" or (m.dtype == "auto" and gpu_mem_gib is not None)
    p = cfg.placement
    return PlanRequest(gpus, shape, cfg.train.global_batch, tuple(p.micro_batch_sizes),
                       2 if bf16 else 4, gpu_mem_gib, p.gpu_mem_headroom, p.allow_offload,
                       p.allow_nearest_global_batch)


def choose_layout(global_batch: int, world_size: int, micro_sizes: list[int]) -> Layout:
    """The layout for `world_size` ranks with no memory limit (CPU, or memory unknown)."""
    shape = ModelShape(1, 1, 1, 1, 1, 1, 1)
    return plan(PlanRequest(world_size, shape, global_batch, tuple(micro_sizes), 4)).layout


# -- the throughput model (for choosing a GPU count) ---------------------------------------------
def step_time_s(shape: ModelShape, tokens_per_step: int, world: int, gpu_tflops: float,
                mfu: float, scaling: float) -> float:
    """Seconds per optimizer step: 6 flops a parameter a token (8 with recompute), at `mfu` of
    `gpu_tflops` per GPU, times `scaling` for every doubling of the GPU count."""
    flops = (8 if shape.gradient_checkpointing else 6) * shape.parameters * tokens_per_step
    efficiency = scaling ** math.log2(world) if world > 1 else 1.0
    return flops / (world * gpu_tflops * 1e12 * mfu * efficiency)
