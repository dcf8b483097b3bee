"""The chaos soak: `telepathy chaos` with 30+ faults of every kind on the local SLURM cluster.

    python -m bench.chaos [--smoke] [--faults 30] [--seed 7] [--gpus 2] [--nodes 1] [--out F.json]
                          [--picture F.png] [--workdir runs/chaos-soak]
    python -m bench.chaos --nodes 2 --gpus 1 --faults 15 \
        --kinds rank_kill,node_fail,scancel_term,preempt,rank_hang     # the two-node soak (root)

Prints one JSON object: the harness's (every fault: kind, step, rank, detect_s, recover_s,
steps_redone, resumable, recovered; the summary: injected, recovered, lost_runs, exact, ...),
plus figures by kind (median and worst detection and recovery, steps redone). `--picture` writes
the timeline: loss against wall-clock time, every fault marked and shaded until the resumed job's
next step. `--smoke` injects one fault of one kind (CI runs it; figures are not judged there).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from telepathy.chaos.faults import KINDS
from telepathy.chaos.harness import Harness, Options
from telepathy.chaos.report import picture

ROOT = Path(__file__).resolve().parents[1]


def by_kind(faults: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for kind in KINDS:
        mine = [f for f in faults if f["kind"] == kind]
        if not mine:
            continue
        detect = [f["detect_s"] for f in mine if f["detect_s"] is not None]
        recover = [f["recover_s"] for f in mine if f["recover_s"] is not None]
        redone = [f["steps_redone"] for f in mine if f["steps_redone"] is not None]
        out[kind] = {
            "count": len(mine), "recovered": sum(f["recovered"] for f in mine),
            "detect_s_median": round(statistics.median(detect), 1) if detect else None,
            "detect_s_max": max(detect) if detect else None,
            "recover_s_median": round(statistics.median(recover), 1) if recover else None,
            "recover_s_max": max(recover) if recover else None,
            "steps_redone_mean": round(statistics.mean(redone), 1) if redone else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="one rank_kill on one GPU, for CI")
    p.add_argument("--faults", type=int, default=30)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--gpus", type=int, default=2, help="GPUs (ranks) per node")
    p.add_argument("--nodes", type=int, default=1,
                   help="nodes of the job, on a local cluster of that many (root)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"))
    p.add_argument("--workdir", default=str(ROOT / "runs" / "chaos-soak"))
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--picture", help="the timeline PNG")
    args = p.parse_args(argv)
    faults, kinds = args.faults, tuple(args.kinds.split(","))
    gpus = args.gpus
    if args.smoke:  # one rank killed, on one GPU, the reference beside it: the cheapest check
        faults, kinds, gpus = 1, ("rank_kill",), 1
    started = time.time()
    result = Harness(Options(args.config, faults, args.seed, kinds, gpus,
                             Path(args.workdir), nodes=args.nodes)).run()
    report = {"bench": "chaos", "machine": f"{platform.node()} ({platform.machine()}, CPU only)",
              "command": "python -m bench.chaos " + " ".join(argv if argv is not None
                                                             else sys.argv[1:]),
              **result.to_json(), "by_kind": by_kind([f.fields() for f in result.faults]),
              "bench_wall_s": round(time.time() - started, 1)}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.picture:
        picture(result, Path(args.picture))
    print(text)
    return 0 if result.summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
