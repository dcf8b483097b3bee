"""Benchmarks: each prints its report as JSON (and a table on stderr); `--out` keeps it."""

from __future__ import annotations

import argparse
import json
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
