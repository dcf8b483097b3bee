"""A test hook: dump the full optimizer state (fp32 weights, Adam moments) to safetensors.

With `TELEPATHY_DUMP_STATE=<dir>`, every rank joins in gathering each parameter's full fp32
weight and Adam moments (collectives under ZeRO-3) after a checkpoint is saved and after one is
loaded; rank 0 writes `<dir>/{saved,loaded}-step<S>-w<W>.safetensors`. Tests compare them to show
that a resume at another world size carries the optimizer state bit for bit. Unset, a no-op.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV = "TELEPATHY_DUMP_STATE"


def dump(where: str | None, engine: Any, dist: Any, kind: str, step: int) -> None:
    if not where:
        return
    from safetensors.torch import save_file

    from ..engine.adapter import full_state

    tensors, meta = full_state(engine)
    if dist.is_main:
        Path(where).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(Path(where) / f"{kind}-step{step}-w{dist.world_size}.safetensors"),
                  metadata=meta)


class StateDump:
    """Where the dumps go (None: nowhere), read once from the environment."""

    def __init__(self, where: str | None = None):
        self.where = where

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> StateDump:
        return cls(env.get(ENV) or None)

    def after_load(self, engine: Any, dist: Any, step: int) -> None:
        if step:
            dump(self.where, engine, dist, "loaded", step)

    def after_save(self, engine: Any, dist: Any, step: int) -> None:
        dump(self.where, engine, dist, "saved", step)
