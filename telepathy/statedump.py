"""A test hook: dump the full optimizer state (fp32 weights, Adam moments) to safetensors.

With `TELEPATHY_DUMP_STATE=<dir>`, every rank joins in gathering each parameter's full fp32
weight and Adam moments (collectives under ZeRO-3) after a checkpoint is saved and after one is
loaded; rank 0 writes `<dir>/{saved,loaded}-step<S>-w<W>.safetensors`. Tests compare them to show
that a resume at another world size carries the optimizer state bit for bit. Unset, a no-op.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "TELEPATHY_DUMP_STATE"


def dump(engine: Any, dist: Any, kind: str, step: int) -> None:
    where = os.environ.get(ENV)
    if not where:
        return
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    tensors = {}
    for name, param in engine.module.named_parameters():
        tensors[f"{name}/fp32"] = safe_get_full_fp32_param(param)
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key)
    inner = engine.optimizer.optimizer  # the client AdamW over this rank's fp32 partitions
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    steps = [float(inner.state[p]["step"]) for p in engine.optimizer.fp32_partitioned_groups_flat
             if "step" in inner.state.get(p, {})]
    meta = {"param_groups": json.dumps(groups, sort_keys=True, default=str),
            "adam_steps": json.dumps(steps)}
    if dist.is_main:
        Path(where).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(Path(where) / f"{kind}-step{step}-w{dist.world_size}.safetensors"),
                  metadata=meta)


def after_load(engine: Any, dist: Any, step: int) -> None:
    if step:
        dump(engine, dist, "loaded", step)


def after_save(engine: Any, dist: Any, step: int) -> None:
    dump(engine, dist, "saved", step)
