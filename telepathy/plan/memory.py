"""A memory model of DeepSpeed ZeRO-3 training for Llama-family models. Pure arithmetic.

Per rank, with P parameters over W ranks, in bytes (T of the P train; the frozen rest keep
only their 16-bit weights, dtype bytes each, and no gradient or optimizer state):

- persistent model states, sharded: bf16 training keeps 16-bit parameters (2), 16-bit gradient
  partitions (2), fp32 master weights (4) and Adam's two moments (8): 16 P / W. fp32 training
  keeps 4 + 4 + 4 + 8 = 20 P / W (DeepSpeed clones the fp32 partition as its master copy).
- with T < P: dtype bytes for every weight, then gradient, master weights and moments for the
  T trained: (2 P + 14 T) / W in bf16.
- the optimizer step adds an fp32 gradient copy (4 T / W) and one fp32 temporary of torch's
  foreach AdamW (4 T / W).
- buffers: the reduce bucket (`reduce_bucket_size`, 5e8 elements, allocated whole; the engine
  caps it at the model's size, which the host model counts and the GPU model not yet) and the
  prefetch bucket (5e7 elements), in the training dtype; the largest gathered layer.
- activations of one micro-batch: the logits dominate small models (16-bit logits, their fp32
  upcast, softmax and gradient: 14 bytes an element in bf16, 12 in fp32); per layer, with
  gradient checkpointing only each block's input is kept, plus one block's full set during its
  recompute.

The peak is the larger of the forward/backward phase (states + buffers + activations) and the
optimizer step (states + step temporaries + buffers). Offloading the optimizer moves master
weights, moments and the step temporaries to host memory; offloading parameters as well leaves
only the buffers and activations on the GPU.

Calibrated against peaks measured on an H100 (`bench/results/h100-2026-11-23.json`); the error
is reported by `python -m bench.memory_model`.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
OFFLOADS = ("none", "optimizer", "optimizer+params")


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a Llama-family model and its inputs."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    seq_len: int
    gradient_checkpointing: bool = False
    tied_embeddings: bool = False
    total: int | None = None
    """Parameters of the model as counted from its own config (None: the Llama formula)."""
    trainable: int | None = None
    """Parameters that train (None: all); the rest are frozen: 16-bit weights, no gradient,
    no optimizer state."""

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_parameters(self) -> int:
        h, i = self.hidden, self.intermediate
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * i + 2 * h

    @property
    def parameters(self) -> int:
        if self.total is not None:
            return self.total
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + self.layers * self.layer_parameters + self.hidden

    @property
    def trained(self) -> int:
        return self.parameters if self.trainable is None else self.trainable


@dataclass(frozen=True)
class Memory:
    """Bytes per rank, by part, and the peak."""

    states: int
    step_extra: int
    buffers: int
    activations: int
    phases_add: bool = False
    """True for host memory, where the step's temporaries do not reuse the activations' memory."""

    @property
    def peak(self) -> int:
        if self.phases_add:
            return self.states + self.buffers + self.activations + self.step_extra
        return self.states + self.buffers + max(self.activations, self.step_extra)

    @property
    def peak_gib(self) -> float:
        return self.peak / GiB


def activation_bytes(shape: ModelShape, micro: int, dtype_bytes: int) -> int:
    """Activation memory of one micro-batch in the forward/backward pass."""
    tokens = micro * shape.seq_len
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    logits = tokens * shape.vocab * (dtype_bytes + 4 + 4 + 4 if dtype_bytes == 2 else 12)
    # One block's saved tensors: norms, q/k/v, attention output, residuals, MLP gate/up/act.
    block = tokens * (6 * h + 2 * kv + 4 * i) * dtype_bytes
    if shape.gradient_checkpointing:
        layers = shape.layers * tokens * h * dtype_bytes + block
    else:
        layers = shape.layers * block
    return logits + layers


def zero3_memory(shape: ModelShape, world: int, micro: int, dtype_bytes: int,
                 offload: str = "none", host: bool = False) -> Memory:
    """Modelled memory per rank of ZeRO-3 training at this world size and micro-batch.

    `host`: resident host memory of training on CPU instead. An untouched allocation costs
    nothing there (only the used part of the reduce bucket counts), and the C allocator keeps
    the activations' freed memory, so the optimizer step's temporaries add to it (`peak` of the
    returned Memory then sums both phases).
    """
    if offload not in OFFLOADS:
        raise ValueError(f"offload={offload!r}: use one of {', '.join(OFFLOADS)}")
    shard = -(-shape.parameters // world)
    trained = -(-shape.trained // world)
    master_and_moments = 12 * trained
    step_extra = 8 * trained
    # Weights of every parameter; a gradient partition for the trained ones only.
    states = dtype_bytes * shard + dtype_bytes * trained + master_and_moments
    if offload != "none":
        states -= master_and_moments
        step_extra = 0
    if offload == "optimizer+params":
        states = 0
    largest_gathered = max(shape.layer_parameters, shape.vocab * shape.hidden) * dtype_bytes
    # The engine caps the bucket at the model's size (engine.build.reduce_bucket_size). On a GPU
    # the model still counts it whole, as measured on the H100 before that cap: conservative by
    # at most 1 GB (bf16) for models under 5e8 parameters, until measured again.
    bucket = min(REDUCE_BUCKET, shape.trained) if host else REDUCE_BUCKET
    buffers = (bucket + PREFETCH_BUCKET) * dtype_bytes + largest_gathered
    return Memory(states, step_extra, buffers, activation_bytes(shape, micro, dtype_bytes), host)
