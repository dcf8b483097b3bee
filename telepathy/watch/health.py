"""Warnings from system samples. Pure: samples in, conditions out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HealthLimits:
    low_util_pct: float = 20.0
    """GPU utilisation below this ..."""
    low_util_window_s: float = 300.0
    """... for this long is a warning."""
    high_mem_pct: float = 95.0
    """GPU memory above this is a warning."""


def conditions(samples: list[dict[str, Any]], limits: HealthLimits) -> dict[str, str]:
    """Current warning conditions, by key, with a message each; empty when all is well."""
    if not samples:
        return {}
    out: dict[str, str] = {}
    latest = samples[-1]
    window = [s for s in samples if latest["time"] - s["time"] <= limits.low_util_window_s]
    spans_window = latest["time"] - window[0]["time"] >= limits.low_util_window_s * 0.9
    for gpu in latest.get("gpus", []):
        i = gpu["index"]
        utils = [g["util_pct"] for s in window for g in s.get("gpus", []) if g["index"] == i]
        if spans_window and utils and max(utils) < limits.low_util_pct:
            out[f"gpu{i}_low_util"] = (f"GPU {i} utilisation below {limits.low_util_pct:.0f}% for "
                                       f"{limits.low_util_window_s:.0f} s (max {max(utils):.0f}%): "
                                       "input-bound, or a rank is stuck")
        mem_pct = 100.0 * gpu["mem_used_gb"] / gpu["mem_total_gb"] if gpu["mem_total_gb"] else 0.0
        if mem_pct > limits.high_mem_pct:
            out[f"gpu{i}_mem_full"] = (f"GPU {i} memory {mem_pct:.0f}% full "
                                       f"({gpu['mem_used_gb']:.1f}/{gpu['mem_total_gb']:.1f} GB)")
    return out
