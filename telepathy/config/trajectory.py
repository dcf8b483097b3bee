"""Which config changes alter the training trajectory: a resume across one is refused. Pure."""

from __future__ import annotations

from typing import Any

from .schema import Config

# Fields whose change alters the training trajectory: resuming across such a change is refused.
TRAJECTORY_KEYS = (
    "model.*",
    "data.*",
    "train.steps", "train.global_batch", "train.seed", "train.lr", "train.min_lr",
    "train.warmup_steps", "train.weight_decay", "train.beta1", "train.beta2", "train.eps",
    "train.grad_clip",
    "eval.path", "eval.max_examples",  # the best checkpoint compares evaluations of one set
)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def trajectory_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Describe each change between two config dicts that would break an exact resume. A key
    the saved config lacks (written before the key existed) counts as its default."""
    old = {**_flatten(Config().to_dict()), **_flatten(saved)}
    new = _flatten(current)
    changes = []
    for key in sorted(set(old) | set(new)):
        section, _, _ = key.partition(".")
        if f"{section}.*" not in TRAJECTORY_KEYS and key not in TRAJECTORY_KEYS:
            continue
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes
