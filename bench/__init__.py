"""Benchmarks: each prints its report as JSON (and a table on stderr); `--out` keeps it."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], out: str | None) -> None:
    """Print the report as JSON on stdout and, with `out`, write it there too."""
    print(json.dumps(report, indent=1))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1) + "\n")


def add_case_arguments(p: argparse.ArgumentParser, models: list[str], repeats: int) -> None:
    """--smoke, --model, --world, --repeats: which (model, world size) cases a benchmark runs."""
    p.add_argument("--smoke", action="store_true", help="tiny model, world 1, one repeat")
    p.add_argument("--model", choices=models)
    p.add_argument("--world", type=int, choices=[1, 2])
    p.add_argument("--repeats", type=int, default=repeats)


def cases_of(args: argparse.Namespace, models: list[str]) -> tuple[list[tuple[str, int]], int]:
    """The (model, world size) cases and repeats that add_case_arguments' arguments ask for."""
    if args.smoke:
        return [("tiny", 1)], 1
    chosen = [args.model] if args.model else models
    worlds = [args.world] if args.world else [1, 2]
    return [(m, w) for m in chosen for w in worlds], args.repeats


def seconds(value: float) -> float:
    """A duration for a report: four significant digits, so that a copy of a few microseconds
    (the smoke's tiny model) stays what it was measured, not 0.0 at a fixed number of decimals."""
    return float(f"{value:.4g}")


def ratios(parts: dict[str, tuple[float, float]],
           digits: int = 3) -> tuple[dict[str, float | None], dict[str, str]]:
    """Each named ratio `numerator / denominator`, and what could not be measured and why: a
    ratio whose denominator is not a positive finite number (a duration below the timer's
    resolution) is None, with its reason in the second dict, never a division by zero or inf."""
    out: dict[str, float | None] = {}
    not_measured: dict[str, str] = {}
    for name, (num, den) in parts.items():
        if math.isfinite(num) and math.isfinite(den) and den > 0:
            out[name] = round(num / den, digits)
        else:
            out[name] = None
            not_measured[name] = (f"not measured: its denominator was {den!r} (below the timer's "
                                  "resolution at this size; the full benchmark measures it)")
    return out, not_measured
