"""The RNG states a checkpoint carries (python, numpy, torch), as tensors plus JSON (no pickle)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.uint32).astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {"python_version": py_version, "python_gauss": py_gauss, "numpy_name": np_name,
            "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss),
            "numpy_gauss": float(np_gauss)}
    return tensors, meta


def restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    random.setstate((meta["python_version"], tuple(int(x) for x in tensors["python"].tolist()),
                     meta["python_gauss"]))
    np.random.set_state((meta["numpy_name"], tensors["numpy"].numpy().astype(np.uint32),
                         meta["numpy_pos"], meta["numpy_has_gauss"], meta["numpy_gauss"]))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def new_rank_seed(train_seed: int, step: int, rank: int) -> int:
    """The seed of a rank that did not exist when the checkpoint was written (a resume on more
    GPUs): rank r < old world size restores its saved state, rank r >= it is seeded from this."""
    return (train_seed * 1_000_003 + step * 1_009 + rank) % 2**63


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
