"""`telepathy chaos --config C [--faults N] [--seed S] [--kinds k1,k2] [--gpus N] [--nodes N]
[--json]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core import exits
from ..core.errors import TelepathyError
from .faults import KINDS, FaultError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="telepathy chaos",
        description="Run a job once uninterrupted, then again with N faults injected at seeded "
                    "random moments; report detection and recovery of each and compare every "
                    "loss with the reference. Exit 0 only when every fault was detected and "
                    "recovered, no run was lost, the run directory stayed resumable and the "
                    "losses match.")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny-cpu.yaml")
    p.add_argument("--faults", type=int, default=4, help="how many faults (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of kinds, moments and ranks")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="comma-separated fault kinds (default: all): " + ", ".join(KINDS))
    p.add_argument("--gpus", type=int, default=2,
                   help="GPUs (ranks) per node of the job (default 2)")
    p.add_argument("--nodes", type=int, default=1,
                   help="nodes of the job (default 1); above 1 the harness starts a local "
                        "cluster of that many nodes (root) and node_fail kills one of them")
    p.add_argument("--workdir", default="runs/chaos",
                   help="where the reference, the chaos run and their logs go")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value after the harness's own settings")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--picture", help="write the timeline (loss against time, faults marked) here")
    p.add_argument("--pace-s", type=float, default=0.1,
                   help="sleep added to every step of both jobs so that faults land mid-run "
                        "(default %(default)s; 0 for a model whose steps take long anyway)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from .harness import Harness, Options
    from .report import picture, print_report

    args = parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if args.faults < 1:
        print(f"telepathy chaos: --faults={args.faults}: give at least 1", file=sys.stderr)
        return exits.BAD_INPUT
    try:
        harness = Harness(Options(args.config, args.faults, args.seed, kinds, args.gpus,
                                  Path(args.workdir), tuple(args.set), args.pace_s,
                                  nodes=args.nodes))
        result = harness.run()
    except (TelepathyError, ValueError, FaultError) as exc:
        print(f"telepathy chaos: {exc}", file=sys.stderr)
        return exits.BAD_INPUT
    (harness.work / "chaos.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    (harness.work / "timeline.json").write_text(json.dumps(result.timeline) + "\n")
    if args.picture:
        picture(result, Path(args.picture))
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print_report(result, Console(highlight=False, width=max(120, Console().width)))
    return exits.OK if result.summary["ok"] else exits.FAILED
