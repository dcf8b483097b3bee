"""The run configuration's schema: nested dataclasses, each field documented, each value
validated in `__post_init__` with an error that names the key, the value and the fix. Pure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..core import exits
from ..core.errors import ConfigError

SIGNAL_NAMES = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGCONT")
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox")
"""`model_type`s a model is built from scratch for (`model.arch`); a pretrained model
(`model.pretrained_path`) may be any causal LM transformers loads."""
SHARED_KV_ARCHS = ("gpt2", "gpt_neox")
"""Archs without grouped-query attention: num_kv_heads must equal num_heads."""
DTYPES = ("auto", "float32", "bfloat16")
TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")


def _require(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


def check_reference(ref: str, key: str) -> None:
    """A reference to user code: "PKG.MOD:FUNC", both parts dotted Python names."""
    mod, sep, func = ref.partition(":")
    ok = bool(sep) and all(part.isidentifier() for part in mod.split(".")) and \
        all(part.isidentifier() for part in func.split("."))
    _require(ok, key, ref, 'write it as "PKG.MODULE:FUNCTION" (e.g. "my_bridge:build", found '
             "in the config file's directory or the working directory)")


@dataclass
class LoraConfig:
    r: int = 0
    """Rank of the LoRA adapters (peft); 0 turns LoRA off and the model trains as it is."""
    alpha: float = 16.0
    """LoRA scaling numerator: the adapters' update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input (its random state is saved and resumed like any other)."""
    target_modules: list[str] | None = None
    """Module names (or name suffixes, as peft matches them) that get adapters; None: the
    architecture's attention projections (q, k, v and output)."""

    def __post_init__(self) -> None:
        _require(self.r >= 0, "model.lora.r", self.r, "must be >= 0 (0 turns LoRA off)")
        _require(self.alpha > 0, "model.lora.alpha", self.alpha, "must be > 0")
        _require(0 <= self.dropout < 1, "model.lora.dropout", self.dropout, "must lie in [0, 1)")
        _require(self.target_modules is None or len(self.target_modules) >= 1,
                 "model.lora.target_modules", self.target_modules,
                 "name at least one module (e.g. [q_proj, v_proj]) or leave it null")


@dataclass
class ModelConfig:
    arch: str = "llama"
    """transformers model_type of a model built from scratch from the fields below: llama,
    mistral, qwen2, qwen3, gemma2, phi3, gpt2 or gpt_neox. Ignored with pretrained_path."""
    pretrained_path: str | None = None
    """Local directory of any causal LM `AutoModelForCausalLM.from_pretrained` loads (config.json
    and safetensors weights); None builds from the fields below."""
    trainable: list[str] | None = None
    """Globs over the parameter names (`named_parameters()` of the model, before LoRA wraps
    it, e.g. `model.layers.*.mlp.*`); the rest is frozen. None: every parameter trains (with
    LoRA: only the adapters, and the parameters these globs name)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters through peft (r > 0 turns them on; the base is then frozen)."""
    hidden_size: int = 64
    """Width of the residual stream."""
    intermediate_size: int = 172
    """Width of the MLP."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide num_heads."""
    vocab_size: int = 256
    """Vocabulary size; every token id in the data must be below it."""
    max_seq_len: int = 256
    """Longest sequence the position embedding supports; must be >= data.seq_len."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    dtype: str = "auto"
    """Training precision: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    module: str | None = None
    """A model of your own code, "PKG.MOD:FUNC": FUNC(model.options) returns a torch.nn.Module
    whose forward(**batch) returns a scalar loss or an object with .loss (a Hugging Face model's
    output). Imported on every rank under train.seed, with the config file's directory and the
    working directory on sys.path. Its parameters with requires_grad=False are frozen;
    model.trainable applies to its parameter names. The model fields above then describe only
    the activations for the planner (set them to the module's largest transformer)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Any mapping, handed to model.module's FUNC as it is."""
    base_paths: list[str] | None = None
    """With model.module: the directories its frozen pretrained weights are read from. Their
    files are checksummed at the first start and verified at every start (a change is refused),
    and checkpoints then hold only what trains. None: frozen parameters are saved as well."""

    def __post_init__(self) -> None:
        if self.module is not None:
            check_reference(self.module, "model.module")
            _require(self.pretrained_path is None, "model.pretrained_path", self.pretrained_path,
                     "a run of model.module builds its own model: load pretrained weights in "
                     "its FUNC, and list their directories in model.base_paths")
            _require(not self.gradient_checkpointing, "model.gradient_checkpointing", True,
                     "a module of your own recomputes where it chooses: call "
                     "gradient_checkpointing_enable() on its Hugging Face parts in its FUNC")
            _require(self.lora.r == 0, "model.lora.r", self.lora.r, "LoRA on model.module is "
                     "the module's own: add it with peft in its FUNC (get_peft_model), or set "
                     "model.lora.r to 0")
        _require(self.base_paths is None or (self.module is not None and len(self.base_paths) >= 1),
                 "model.base_paths", self.base_paths, "list the directories model.module's "
                 "frozen weights come from (it needs model.module), or leave it null")
        _require(self.arch in ARCHS, "model.arch", self.arch,
                 f"telepathy builds {', '.join(ARCHS)} from scratch; for any other causal LM "
                 "set model.pretrained_path to a local directory of it")
        _require(self.dtype in DTYPES, "model.dtype", self.dtype, f"use one of {', '.join(DTYPES)}")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            _require(value >= 1, f"model.{name}", value, "must be a positive integer")
        _require(self.hidden_size % self.num_heads == 0, "model.hidden_size", self.hidden_size,
                 f"must be divisible by model.num_heads={self.num_heads}")
        _require(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads", self.num_kv_heads,
                 f"must divide model.num_heads={self.num_heads}")
        if self.pretrained_path is None and self.arch in SHARED_KV_ARCHS:
            _require(self.num_kv_heads == self.num_heads, "model.num_kv_heads", self.num_kv_heads,
                     f"{self.arch} has no grouped-query attention: set it to model.num_heads="
                     f"{self.num_heads}")
        _require(self.trainable is None or len(self.trainable) >= 1, "model.trainable",
                 self.trainable, "give at least one glob (e.g. ['lm_head.*']) or null to train "
                 "every parameter")


@dataclass
class DataConfig:
    path: str | None = None
    """Pre-tokenized token file (.npy, or raw .bin of `dtype`). None: generate a synthetic corpus."""
    synthetic_tokens: int = 100_000
    """Size of the generated corpus when path is None (written once into the run directory)."""
    dtype: str = "uint16"
    """Element type of a raw .bin token file (.npy files carry their own)."""
    seq_len: int = 64
    """Tokens per training sample (each sample reads seq_len + 1 tokens)."""
    seed: int = 1234
    """Seed of the per-epoch sample permutation (and of the synthetic corpus)."""
    module: str | None = None
    """A dataset of your own code, "PKG.MOD:FUNC": FUNC(data.options) returns a map-style
    dataset (__len__, __getitem__(i) -> a dict of tensors of fixed shapes; an optional
    collate(list of items) -> batch). telepathy keeps the order: a seeded permutation of the
    indices per epoch (data.seed), the position in every checkpoint. Instead of data.path."""
    options: dict[str, Any] = field(default_factory=dict)
    """Any mapping, handed to data.module's FUNC as it is."""
    packing: bool = True
    """For a file of examples (`telepathy data prepare --format chat|prompt-completion`): pack
    several examples into each row of seq_len tokens, none attending to another (position ids
    restart at each example); false: one example a row, padded. A token file ignores it."""

    def __post_init__(self) -> None:
        _require(self.seq_len >= 1, "data.seq_len", self.seq_len, "must be a positive integer")
        _require(self.dtype in TOKEN_DTYPES, "data.dtype", self.dtype,
                 f"use one of {', '.join(TOKEN_DTYPES)}")
        if self.module is not None:
            check_reference(self.module, "data.module")
            _require(self.path is None, "data.path", self.path, "data.module reads its own "
                     "data: set one of data.path and data.module")
        elif self.path is None:
            _require(self.synthetic_tokens > self.seq_len, "data.synthetic_tokens",
                     self.synthetic_tokens,
                     "set data.path to a pre-tokenized file, or data.synthetic_tokens to more than "
                     f"data.seq_len={self.seq_len} to generate a corpus")


@dataclass
class TrainConfig:
    steps: int = 100
    """Total optimizer steps of the run."""
    global_batch: int = 8
    """Samples per optimizer step, summed over all ranks and accumulation steps. Fixed for a run."""
    seed: int = 0
    """Seed of model initialisation and of every rank's RNG."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warm-up length in optimizer steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold; 0 disables clipping."""
    log_every: int = 10
    """Log a progress line every this many steps."""
    deterministic: bool = True
    """Use deterministic kernels so that a resumed run repeats the same losses bit for bit."""
    hang_timeout_s: float = 600
    """Watchdog: a rank that sees no optimizer step complete and no save make progress for this
    long dumps every thread's stack, records a `hang` event and exits 124, and the job requeues.
    Start-up with the first step gets the larger of this, twice the run's longest start-up and
    120 s; a running save the larger of this and twice the longest recent save. Collectives give
    up after twice this (at least 30 minutes)."""
    node_timeout_s: float = 60
    """On a job of several nodes: each node's local rank 0 writes a heartbeat into the run
    directory (every node_timeout_s / 6 s, between 1 and 10 s), and a rank that sees another
    node's stop changing for this long records a `node_lost` event and exits 79, and the job
    requeues: a node that vanished (power, a kernel panic, a cut link) ends the allocation in
    this time, not at hang_timeout_s. 0 turns it off."""

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "train.steps", self.steps, "must be a positive integer")
        _require(self.global_batch >= 1, "train.global_batch", self.global_batch,
                 "must be a positive integer")
        _require(self.lr > 0, "train.lr", self.lr, "must be positive")
        _require(0 <= self.min_lr <= self.lr, "train.min_lr", self.min_lr,
                 f"must lie between 0 and train.lr={self.lr}")
        _require(0 <= self.warmup_steps <= self.steps, "train.warmup_steps", self.warmup_steps,
                 f"must lie between 0 and train.steps={self.steps}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2",
                 (self.beta1, self.beta2), "each must lie in [0, 1)")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0")
        _require(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _require(self.hang_timeout_s >= 10, "train.hang_timeout_s", self.hang_timeout_s,
                 "must be >= 10 seconds (a step or a save slower than it counts as a hang)")
        _require(self.node_timeout_s == 0 or self.node_timeout_s >= 6, "train.node_timeout_s",
                 self.node_timeout_s, "must be 0 (off) or >= 6 seconds (a heartbeat comes every "
                 "node_timeout_s / 6 s, at least 1 s apart)")


CHECKPOINT_HASHES = ("xxh3_128", "blake3", "sha256")
"""The algorithms telepathy.checkpoint.hashing knows (a test keeps the two in step)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every this many optimizer steps; 0 disables step-based saves."""
    every_min: float = 0.0
    """Save when this many minutes have passed since the last save; 0 disables."""
    keep: int = 3
    """Newest complete checkpoints to keep (at least 2, so one always survives a bad save)."""
    async_save: bool = True
    """Write checkpoints in the background: training waits only for the copy to host memory."""
    keep_best: bool = False
    """Keep the checkpoint with the lowest eval_loss beside the newest `keep`: a checkpoint is
    written at every evaluation that improves on the best, and never pruned while it is the
    best (needs eval.path and eval.every_steps)."""
    hash: str = "xxh3_128"
    """Checksum of every chunk of every file, recorded in each manifest: xxh3_128 (fast; catches
    accidental damage), blake3 or sha256 (cryptographic). Older checkpoints verify with theirs."""
    mirror: str | None = None
    """A verified copy of every checkpoint on object storage, uploaded by rank 0 in the
    background (s3://bucket/prefix/run, or any fsspec URL; needs the `mirror` extra). A start
    with no valid local checkpoint as new as the mirror's resumes from the mirror. The endpoint
    and keys come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or ~/.aws/."""
    mirror_keep: int = 0
    """Newest complete checkpoints kept on the mirror (the best too, with keep_best); 0: `keep`."""
    mirror_options: dict[str, Any] = field(default_factory=dict)
    """Passed to fsspec for the mirror's filesystem (e.g. {"profile": "ceph"} for s3fs)."""

    def __post_init__(self) -> None:
        _require(self.hash in CHECKPOINT_HASHES, "checkpoint.hash", self.hash,
                 f"choose one of {', '.join(CHECKPOINT_HASHES)}")
        _require(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "must be >= 0")
        _require(self.every_min >= 0, "checkpoint.every_min", self.every_min, "must be >= 0")
        _require(self.keep >= 2, "checkpoint.keep", self.keep,
                 "keep at least 2 so a failed save never leaves the run without a checkpoint")
        _require(self.mirror_keep == 0 or self.mirror_keep >= 2, "checkpoint.mirror_keep",
                 self.mirror_keep, "keep at least 2 on the mirror (or 0: the same as keep)")
        _require(self.mirror is None or "://" in self.mirror, "checkpoint.mirror", self.mirror,
                 "give a URL such as s3://bucket/prefix/run (or file:///path for a directory)")

    @property
    def mirror_kept(self) -> int:
        """Checkpoints kept on the mirror: mirror_keep, or keep when it is 0."""
        return self.mirror_keep or self.keep


@dataclass
class EvalConfig:
    path: str | None = None
    """A prepared file of held-out examples (any format `telepathy data prepare` writes; a token
    file is read in windows of data.seq_len + 1). None: no evaluation."""
    every_steps: int = 0
    """Evaluate after every this many optimizer steps, and after the last; 0 turns it off."""
    max_examples: int = 0
    """Evaluate on the file's first this many examples (windows of a token file); 0: all."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "eval.every_steps", self.every_steps,
                 "must be >= 0 (0 turns evaluation off)")
        _require(self.max_examples >= 0, "eval.max_examples", self.max_examples,
                 "must be >= 0 (0: every example of eval.path)")
        _require(self.every_steps == 0 or self.path is not None, "eval.every_steps",
                 self.every_steps, "set eval.path to a prepared validation file, or set "
                 "eval.every_steps to 0")

    @property
    def enabled(self) -> bool:
        return self.path is not None and self.every_steps > 0


@dataclass
class PreemptionConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that mean: save at the next step boundary, then exit for requeue."""
    exit_code: int = exits.PREEMPTED
    """Exit status after a preemption save (75 = EX_TEMPFAIL: saved, please requeue)."""
    max_restarts: int = 50
    """Stop requeueing after this many restarts of the run."""
    crash_loop_limit: int = 3
    """Stop requeueing when this many allocations in a row end without progress."""

    def __post_init__(self) -> None:
        for name in self.signals:
            _require(name in SIGNAL_NAMES, "preemption.signals", name,
                     f"use signal names from {', '.join(SIGNAL_NAMES)}")
        _require(len(self.signals) >= 1, "preemption.signals", self.signals,
                 "name at least one signal, e.g. [SIGTERM]")
        _require(self.exit_code not in (exits.FINISHED, exits.FAILED, exits.BAD_INPUT,
                                        exits.OUT_OF_MEMORY, exits.NODE_LOST, exits.HUNG)
                 and 0 < self.exit_code < 126,
                 "preemption.exit_code", self.exit_code,
                 "use a code in 3..125 other than 76, 79 and 124 (telepathy's out-of-memory, "
                 "lost-node and hang exits), which no crash produces (default 75)")
        _require(self.max_restarts >= 0, "preemption.max_restarts", self.max_restarts, "must be >= 0")
        _require(self.crash_loop_limit >= 1, "preemption.crash_loop_limit", self.crash_loop_limit,
                 "must be >= 1")


@dataclass
class PlacementConfig:
    micro_batch_sizes: list[int] = field(default_factory=lambda: [8, 4, 2, 1])
    """Allowed per-rank micro-batch sizes; the largest that divides the per-rank batch and fits
    the GPU's memory is used."""
    gpu_mem_gib: float = 79.1
    """GPU memory in GiB assumed by `telepathy.plan` (an H100 80GB has 79.1 GiB); on a GPU,
    resume reads the real size."""
    gpu_mem_headroom: float = 0.9
    """Fraction of GPU memory a placement may plan to use."""
    allow_offload: bool = True
    """Offload optimizer (then parameter) states to host memory when nothing else fits."""
    allow_nearest_global_batch: bool = False
    """When train.global_batch does not divide over the GPUs (e.g. 3), train with the nearest
    global batch that does instead of refusing (changes the trajectory)."""
    max_oom_retries: int = 3
    """Out-of-memory errors in one allocation recovered by shrinking the micro-batch."""
    gpu_tflops: float = 989.0
    """Peak dense bf16 TFLOP/s of one GPU (H100 SXM), for the step-time model of telepathy.plan."""
    mfu: float = 0.25
    """Fraction of gpu_tflops training reaches (0.25 measured for the 1.1B config on one H100)."""
    scaling: float = 0.9
    """Throughput kept per doubling of the GPU count (communication overhead)."""

    def __post_init__(self) -> None:
        _require(len(self.micro_batch_sizes) >= 1 and all(m >= 1 for m in self.micro_batch_sizes),
                 "placement.micro_batch_sizes", self.micro_batch_sizes,
                 "give a list of positive integers, e.g. [8, 4, 2, 1]")
        _require(self.gpu_mem_gib > 0, "placement.gpu_mem_gib", self.gpu_mem_gib, "must be > 0")
        _require(0 < self.gpu_mem_headroom <= 1, "placement.gpu_mem_headroom",
                 self.gpu_mem_headroom, "must lie in (0, 1]")
        _require(self.max_oom_retries >= 0, "placement.max_oom_retries", self.max_oom_retries,
                 "must be >= 0")
        for name in ("gpu_tflops", "mfu", "scaling"):
            _require(getattr(self, name) > 0, f"placement.{name}", getattr(self, name),
                     "must be > 0")
        _require(self.mfu <= 1 and self.scaling <= 1, "placement.mfu/scaling",
                 (self.mfu, self.scaling), "are fractions: at most 1")


@dataclass
class SlurmConfig:
    partition: str = "preemptible"
    """Partition the job script asks for."""
    gpu_type: str = "h100"
    """GRES type of the GPUs (`--gpus-per-node=<gpu_type>:<count>`)."""
    gpus_per_node: int = 4
    """H100s per node (1-4); one training rank per GPU."""
    cpus_per_gpu: int = 8
    """CPU cores per GPU."""
    mem_per_gpu_gb: int = 64
    """Host memory per GPU, in GB."""
    time_limit_min: int = 240
    """Job time limit in minutes."""
    signal_lead_s: int = 120
    """Seconds before the time limit at which SLURM sends the grace signal."""
    requeue_timeout_s: int = 60
    """Timeout of the `scontrol requeue` call."""

    def __post_init__(self) -> None:
        _require(1 <= self.gpus_per_node <= 4, "slurm.gpus_per_node", self.gpus_per_node,
                 "telepathy runs 1-4 GPUs per node")
        _require(self.time_limit_min >= 1, "slurm.time_limit_min", self.time_limit_min, "must be >= 1")
        _require(self.signal_lead_s >= 1, "slurm.signal_lead_s", self.signal_lead_s, "must be >= 1")


@dataclass
class MonitorConfig:
    interval_s: float = 10.0
    """Seconds between GPU/host samples (system-<host>.jsonl); 0 turns the sampler off."""
    low_util_pct: float = 20.0
    """Warn when a GPU stays below this utilisation ..."""
    low_util_window_s: float = 300.0
    """... for this many seconds."""
    high_mem_pct: float = 95.0
    """Warn when a GPU's memory is fuller than this."""

    def __post_init__(self) -> None:
        _require(self.interval_s >= 0, "monitor.interval_s", self.interval_s, "must be >= 0")
        _require(0 <= self.low_util_pct <= 100, "monitor.low_util_pct", self.low_util_pct,
                 "must lie in 0..100")
        _require(0 < self.high_mem_pct <= 100, "monitor.high_mem_pct", self.high_mem_pct,
                 "must lie in 0..100")


WANDB_MODES = ("disabled", "offline", "online")


@dataclass
class WandbConfig:
    mode: str = "disabled"
    """disabled, offline (files under RUN_DIR/wandb/, `wandb sync` them later) or online."""
    project: str = "telepathy"
    entity: str | None = None
    """W&B team or user; None: the logged-in user's default."""
    tags: list[str] = field(default_factory=list)
    run_name: str | None = None
    """The run's display name; None: the run directory's name. Its id is kept in the run
    directory (track/state.json) and resumed at every allocation."""

    def __post_init__(self) -> None:
        _require(self.mode in WANDB_MODES, "track.wandb.mode", self.mode,
                 f"choose one of {', '.join(WANDB_MODES)}")


@dataclass
class MlflowConfig:
    enabled: bool = False
    tracking_uri: str | None = None
    """None: a SQLite database in the run directory (sqlite:///RUN_DIR/mlflow/mlflow.db)."""
    experiment: str = "telepathy"


@dataclass
class TrackConfig:
    """Trackers fed by rank 0's relay process from the run's own files (never by the training
    loop): one continuous tracker run per run directory, whatever happened to it."""

    tensorboard: bool = False
    """Event files under RUN_DIR/tensorboard/ (`tensorboard --logdir RUN_DIR/tensorboard`)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    flush_s: float = 15.0
    """How long an ending allocation waits for the relay to catch up (after the last save);
    what it did not send, the next allocation sends first."""

    def __post_init__(self) -> None:
        _require(self.flush_s >= 0, "track.flush_s", self.flush_s, "must be >= 0")

    @property
    def trackers(self) -> list[str]:
        """The trackers that are on, by name."""
        return [name for name, on in (("tensorboard", self.tensorboard),
                                      ("wandb", self.wandb.mode != "disabled"),
                                      ("mlflow", self.mlflow.enabled)) if on]

    @property
    def enabled(self) -> bool:
        return bool(self.trackers)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    code_path: list[str] = field(default_factory=list)
    """Directories searched first for model.module and data.module (the working directory
    follows them). Empty: the config file's directory, filled in when the file is read."""

    def __post_init__(self) -> None:
        _require(self.data.module is None or self.model.module is not None, "data.module",
                 self.data.module, "a dataset of your own feeds a model of your own: set "
                 "model.module too (a Hugging Face causal LM reads data.path)")
        _require(self.data.module is None or self.eval.path is None, "eval.path",
                 self.eval.path, "an evaluation reads a prepared file into the model, and "
                 "data.module's samples are of another kind: leave eval.path unset with "
                 "data.module (a held-out dataset module is not supported yet)")
        _require(not self.checkpoint.keep_best or self.eval.enabled, "checkpoint.keep_best",
                 self.checkpoint.keep_best, "the best checkpoint is chosen by eval_loss: set "
                 "eval.path and eval.every_steps > 0, or keep_best to false")
        if self.model.pretrained_path is None:  # else: checked against its config.json
            _require(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
                     self.data.seq_len, f"must be <= model.max_seq_len={self.model.max_seq_len}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
