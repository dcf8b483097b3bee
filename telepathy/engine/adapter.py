"""Every place telepathy reaches into DeepSpeed's internals, in one file.

A DeepSpeed upgrade should touch this file and nothing else. Each function names what it relies
on; `tests/` exercise each of them against the real engine (ZeRO-3 on CPU with gloo):

- `use_cpu_accelerator`, `init_distributed`: `DS_ACCELERATOR`, and
  `deepspeed.ops.__compatible_ops__` (skip a shared-memory op's JIT build);
- `skip_muon_import`: the module DeepSpeed imports to ask whether the optimizer is Muon;
- `import_deepspeed`: `import deepspeed` without its autotuner's optional `import mlflow`;
- `universal_command`, `LATEST_UNIVERSAL`: the command line of DeepSpeed's `ds_to_universal` and
  the pointer file it leaves;
- `install_checkpoint_engine`, `zipped_serialization`: the checkpoint-engine hook
  (`engine.checkpoint_engine`, `CheckpointEngine`) and `engine._config.checkpoint_config`;
- `save_checkpoint`: DeepSpeed's ZeRO-3 save without its collectives (`_save_checkpoint`,
  `_save_zero_checkpoint`, `ds_status`/`ds_persist` of the parameters, `free_param`'s empty
  `.data`);
- `step_counters`, `drop_partial_step`: the micro-step counters and the ZeRO-3 parameter
  coordinator, to drop a step that ran out of memory;
- `repair_universal_load`: two defects of the ZeRO-3 universal load (0.19.8);
- `fp32_weights`: DeepSpeed's own consolidation of a ZeRO checkpoint's fp32 master weights
  (`zero_to_fp32`, lazy: one parameter gathered at a time from memory-mapped files);
- `full_state`: every parameter's fp32 weight and Adam moments (`safe_get_full_*`, the client
  optimizer behind ZeRO-3) for the state dumps of tests;
- `numel`, `full_shape`: the real size of a partitioned parameter (`ds_numel`, `ds_shape`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CheckpointError


def use_cpu_accelerator(override: bool = True) -> None:
    """Make DeepSpeed run on the CPU (before it is imported: it picks its accelerator then, and
    otherwise probes and warns on stdout). `override=False` keeps a choice already made."""
    if override or "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cpu"


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def skip_muon_import() -> bool:
    """Stand in for DeepSpeed's Muon optimizer module, unless it is loaded already; whether
    this call put the stand-in there.

    DeepSpeed (0.19.8) imports that module while it builds the engine only to ask whether the
    client optimizer is a `MuonWithAuxAdam`. Importing it compiles kernels (torch._dynamo and
    inductor come with it): ~2.4 s of CPU on every rank at every start, for a question whose
    answer is no: telepathy's optimizer is AdamW. A class that nothing is an instance of gives
    the same answer."""
    if MUON_MODULE in sys.modules:
        return False
    import types

    module = types.ModuleType(MUON_MODULE, "telepathy's stand-in: Muon is never used")

    class MuonWithAuxAdam:
        """Stand-in: no optimizer telepathy builds is one."""

    module.MuonWithAuxAdam = MuonWithAuxAdam
    sys.modules[MUON_MODULE] = module
    return True


def import_deepspeed():
    """`import deepspeed`, without the `import mlflow` its autotuner tries at import time.

    DeepSpeed (0.19.8) imports mlflow, when it is installed, only so that its autotuner can log
    to it; telepathy never runs the autotuner, and its MLflow tracker lives in the relay
    process. With mlflow installed (the `[mlflow]` extra) that import costs ~0.6 s of CPU on
    every rank at every start. The autotuner's own `try: import mlflow` then finds none, as
    where mlflow is not installed. A process that imported mlflow already keeps it."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while this stands
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def init_distributed(backend: str, timeout_s: float | None = None) -> None:
    """Start DeepSpeed's process group (the variables it reads must be set); `timeout_s` bounds
    every collective (DeepSpeed's default: 600 s)."""
    from datetime import timedelta

    deepspeed = import_deepspeed()

    # A shared-memory collective that JIT-compiles for ~46 s and changes nothing for gloo.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend,
                               **({"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}))


def grad_norm(engine: Any) -> float | None:
    """The global gradient norm of the last optimizer step (before clipping), as ZeRO computed it
    for every rank alike; None when DeepSpeed did not compute one."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def numel(param: torch.nn.Parameter) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it away."""
    return getattr(param, "ds_numel", param.numel())


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """Shape of a parameter, also when ZeRO-3 has partitioned it away."""
    return getattr(param, "ds_shape", param.shape)


# -- checkpoints -------------------------------------------------------------------------------
LATEST_UNIVERSAL = "latest_universal"
"""The pointer file ds_to_universal writes beside its output (never trusted, removed)."""


def universal_command(source: Path, target: Path, workers: int) -> list[str]:
    """DeepSpeed's converter of a ZeRO checkpoint to the universal format (any world size)."""
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(source), "--output_folder", str(target),
            "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]


def zipped_serialization(engine: Any) -> bool:
    """Whether DeepSpeed's config asks for torch's zip serialization of checkpoint files."""
    return bool(engine._config.checkpoint_config.get("checkpoint_serialization", True))


def install_checkpoint_engine(engine: Any, save: Callable[[Any, str], None],
                              load: Callable[[str, Any], Any] | None = None) -> None:
    """Make `engine.save_checkpoint` hand each file's state to `save(state_dict, path)` instead of
    writing it, and `engine.load_checkpoint` read each file with `load(path, map_location)`
    (default: torch.load; the files were verified before)."""
    import_deepspeed()
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class TelepathyCheckpointEngine(CheckpointEngine):
        def __init__(self) -> None:
            super().__init__(None)
            self.name = "TelepathyCheckpointEngine"

        def create(self, info) -> None:
            pass

        def save(self, state_dict, path: str) -> None:
            save(state_dict, path)

        def load(self, path: str, map_location=None):
            if load is not None:
                return load(path, map_location)
            return torch.load(path, map_location=map_location, weights_only=False)

        def commit(self, info) -> bool:
            return True

    engine.checkpoint_engine = TelepathyCheckpointEngine()


def _local_save_applies(engine: Any) -> str | None:
    """Why DeepSpeed's own `save_checkpoint` must run (None: `save_checkpoint` below may skip it)."""
    if engine.zero_optimization_stage() != 3:
        return f"ZeRO stage {engine.zero_optimization_stage()}"
    if engine.has_moe_layers or getattr(engine, "_autoep_folding_spec", None) is not None:
        return "mixture-of-experts layers"
    if engine.zero_nvme_offload_optimizer():
        return "the optimizer offloaded to NVMe"
    if not hasattr(engine.optimizer, "checkpoint_event_prologue"):
        return "an optimizer without ZeRO-3's checkpoint events"
    return None


def save_checkpoint(engine: Any, save_dir: str, tag: str, exclude_frozen: bool) -> bool:
    """Write a ZeRO-3 checkpoint through the installed checkpoint engine, as DeepSpeed's
    `save_checkpoint(save_dir, tag, client_state={}, save_latest=False,
    exclude_frozen_parameters=exclude_frozen)` writes it, but without its collectives. Whether
    the collective-free path was taken (False: DeepSpeed's own save ran).

    DeepSpeed's save (0.19.8) wraps two local walks, `_save_checkpoint` (the model states file:
    the module's state dict, parameter shapes, scheduler, counters) and `_save_zero_checkpoint`
    (this rank's flat fp32 partitions and optimizer state), in collectives: a barrier, an
    all-reduce of the tag's hash, ZeRO-3's checkpoint prologue (partition every parameter,
    the persistent ones too) and epilogue (all-gather the persistent parameters again). At a
    step boundary only the persistent parameters are gathered, so the prologue changes nothing
    in the files but their entries, which it empties (`free_param`: `.data` becomes a 0-element
    tensor). Here their `.data` is swapped for that empty tensor during the walk and put back,
    with no collective, and the two walks run as DeepSpeed runs them: the same files, key for
    key and bit for bit (tests/integration/test_interop.py compares them with DeepSpeed's own).
    Telepathy's tags are the step's name on every rank, so the tag check has nothing to catch.
    Where the walk would differ (a parameter gathered outside the persistent set, a stage,
    offload or MoE this does not cover), DeepSpeed's own save runs instead.
    """
    why = _local_save_applies(engine)
    shown = []
    if why is None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        for param in engine.module.parameters():
            status = getattr(param, "ds_status", None)
            if status is None or status == ZeroParamStatus.NOT_AVAILABLE:
                continue
            if status != ZeroParamStatus.AVAILABLE or not getattr(param, "ds_persist", False) \
                    or param.ds_active_sub_modules:
                why = f"parameter {getattr(param, 'ds_id', '?')} is {status.name}"
                break
            shown.append(param)
    if why is not None:
        engine.save_checkpoint(save_dir, tag=tag, client_state={}, save_latest=False,
                               exclude_frozen_parameters=exclude_frozen)
        return False
    os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
    held = [(param, param.data) for param in shown]
    try:
        for param in shown:
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        engine._save_checkpoint(save_dir, tag, client_state={},
                                exclude_frozen_parameters=exclude_frozen)
    finally:
        for param, data in held:
            param.data = data
    engine._save_zero_checkpoint(save_dir, tag)
    return True


def repair_universal_load(engine: Any, universal: Path) -> list[str]:
    """Undo two defects of DeepSpeed's ZeRO-3 universal load (0.19.8,
    `load_hp_checkpoint_state_from_checkpoint_dir_stage3`); returns what it repaired.

    1. It copies the hyperparameters of parameter group 0 onto every group ("generally the
       same"), so parameters without weight decay (norms) would get group 0's weight decay.
       The universal optimizer_state.pt keeps every group's values; they are reapplied by index.
    2. It assigns one and the same `step` tensor to the Adam state of every group; AdamW
       increments it in place once per group, so after the load Adam's step (and its bias
       correction) advanced twice per optimizer step with two groups. Each group gets its own copy.

    Both were found by comparing the full optimizer state and the losses with an uninterrupted
    run (tests/integration/test_elastic.py). The file read here was verified before.
    """
    saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]["param_groups"]
    inner = engine.optimizer.optimizer
    groups = inner.param_groups
    if len(saved) != len(groups):
        raise CheckpointError(f"{universal} has {len(saved)} optimizer parameter groups, the "
                              f"model has {len(groups)}; resume with the original world size")
    repaired = []
    for i, (group, values) in enumerate(zip(groups, saved)):
        values = {k: v for k, v in values.items() if k != "params"}
        if any(group.get(k) != v for k, v in values.items()):
            repaired.append(f"hyperparameters of group {i}")
        group.update(values)
    seen: set[int] = set()
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        state = inner.state.get(flat, {})
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
                repaired.append("shared Adam step tensor")
            seen.add(id(step))
    return repaired


def fp32_weights(ckpt: Path, lazy: bool = True) -> dict[str, Any]:
    """DeepSpeed's `zero_to_fp32` consolidation of a checkpoint directory's fp32 master weights,
    by parameter name. Lazy: each value gathers its parameter from the memory-mapped optimizer
    files of every rank only when `materialize` is called on it."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(sys.stderr):  # it prints its progress to stdout
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name,
                                                            lazy_mode=lazy)
    except AttributeError as exc:
        if "numel" not in str(exc):
            raise
        raise CheckpointError(
            f"{ckpt.name} stores DeepSpeed's param_shapes as plain tuples (telepathy wrote them so "
            "before its checkpoints were tested with zero_to_fp32), which DeepSpeed's "
            "consolidation cannot read; resume the run for a step to write a readable "
            "checkpoint, then export that one") from None


def materialize(weight: Any) -> torch.Tensor:
    """A tensor from a lazy value of `fp32_weights` (a tensor stays as it is)."""
    return weight if isinstance(weight, torch.Tensor) else weight.contiguous()


def weight_shape(weight: Any) -> tuple[int, ...]:
    return tuple(weight.shape)


# -- a step that ran out of memory -------------------------------------------------------------
def step_counters(engine: Any) -> tuple[int, int]:
    """DeepSpeed's (micro_steps, global_samples) before a step: what to rewind to."""
    return engine.micro_steps, engine.global_samples


def drop_partial_step(engine: Any, counters: tuple[int, int], micro_batch: int,
                      global_batch: int, accum: int) -> None:
    """Release what the failed micro-steps hold (gathered parameters, partial gradients), set the
    new micro-batch, and rewind the counters so the step is retried from its start.

    zero_grad makes the next backward overwrite, not add to, the gradient partitions.
    """
    engine.optimizer.parameter_offload.get_param_coordinator().reset_step()
    engine.empty_partition_cache()
    engine.optimizer.zero_grad()
    engine.set_train_micro_batch_size(micro_batch)
    engine.set_train_batch_size(global_batch)
    micro_steps, samples = counters
    engine.micro_steps = micro_steps - micro_steps % accum
    engine.global_samples = samples


# -- the full optimizer state, for tests ---------------------------------------------------------
def full_state(engine: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Collective under ZeRO-3: every trained parameter's full fp32 weight and Adam moments,
    every frozen one's weight (`<name>/frozen`, in the training dtype), and the optimizer's
    group hyperparameters and Adam steps as metadata."""
    deepspeed = import_deepspeed()
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    tensors = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            with deepspeed.zero.GatheredParameters([param]):
                tensors[f"{name}/frozen"] = param.data.detach().clone()
            continue
        tensors[f"{name}/fp32"] = safe_get_full_fp32_param(param)
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key)
    inner = engine.optimizer.optimizer  # the client AdamW over this rank's fp32 partitions
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    steps = [float(inner.state[p]["step"]) for p in engine.optimizer.fp32_partitioned_groups_flat
             if "step" in inner.state.get(p, {})]
    meta = {"param_groups": json.dumps(groups, sort_keys=True, default=str),
            "adam_steps": json.dumps(steps)}
    return tensors, meta
