"""A run of model.module out again: `trained.safetensors` (the trained parameters under their
names in the module, fp32, from DeepSpeed's zero_to_fp32 consolidation) and
`telepathy-module.json` (the module reference, its options, where its code was found, the base
directories with the checksums of their files, the step). `load_module(DIR)` builds the module
with FUNC(options) and loads the trained parameters into it, once the bases are verified.

Without model.base_paths the checkpoints hold the frozen parameters too, and so does
`trained.safetensors`: nothing else would give them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import basemodel as base
from ..config import config_from_dict
from ..core.errors import CheckpointError, TelepathyError
from ..core.paths import RunPaths
from ..engine import adapter

TRAINED = "trained.safetensors"
DESCRIPTION = "telepathy-module.json"


def write_module(tmp: Path, ckpt: Path, state: dict[str, Any], run: RunPaths
                 ) -> tuple[list[str], int, int]:
    """The trained parameters and the description into `tmp`: (files, tensors, bytes)."""
    cfg = config_from_dict(state["config"])
    try:
        base.check(cfg, run)
    except TelepathyError as exc:
        raise TelepathyError(f"cannot export: {exc}") from None
    weights = adapter.fp32_weights(ckpt, lazy=True)
    seen: set[int] = set()  # a tied weight under two names: once
    weights = {n: w for n, w in weights.items() if not (id(w) in seen or seen.add(id(w)))}
    tensors = {n: adapter.materialize(w).to(torch.float32).contiguous() for n, w in weights.items()}
    save_file(tensors, str(tmp / TRAINED), metadata={"format": "pt"})
    recorded = base.recorded_bases(run) or []
    (tmp / DESCRIPTION).write_text(json.dumps({
        "module": cfg.model.module, "options": cfg.model.options, "code_path": cfg.code_path,
        "seed": cfg.train.seed, "step": state["step"],
        "frozen_included": not recorded,
        "base_paths": [{"path": b["path"], "files": b["files"]} for b in recorded],
    }, indent=1) + "\n")
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return [TRAINED, DESCRIPTION], len(tensors), size


def load_module(directory: str | Path) -> torch.nn.Module:
    """The module of an export: FUNC(options) built (its bases verified against their recorded
    checksums first), the trained parameters loaded into it. Raises TelepathyError naming a
    changed or missing base file, or a parameter the module does not have."""
    from ..engine.usercode import build_module

    directory = Path(directory)
    described = json.loads((directory / DESCRIPTION).read_text())
    for recorded in described["base_paths"]:
        path = Path(recorded["path"])
        now = base.fingerprint_of(path, "model.base_paths")
        changed = [f"{path / n} ({base._how(recorded['files'].get(n), now.get(n))})"
                   for n in sorted(set(recorded["files"]) | set(now))
                   if recorded["files"].get(n) != now.get(n)]
        if changed:
            raise TelepathyError(f"{directory / DESCRIPTION}: the frozen weights the module was "
                                 f"trained on changed: {'; '.join(changed[:5])}; restore them "
                                 "(the export holds only what trained)")
    cfg = config_from_dict({"model": {"module": described["module"],
                                      "options": described["options"]},
                            "code_path": described["code_path"],
                            "train": {"seed": described["seed"]}})
    module = build_module(cfg)
    trained = load_file(str(directory / TRAINED))
    names = dict(module.named_parameters(remove_duplicate=False))
    unknown = sorted(set(trained) - set(names))
    if unknown:
        raise CheckpointError(f"{directory / TRAINED} holds {len(unknown)} tensors the module "
                              f"{described['module']} does not have ({', '.join(unknown[:3])}); "
                              "did its code change since the run?")
    with torch.no_grad():
        for name, value in trained.items():
            names[name].copy_(value.to(names[name].dtype))
    return module
