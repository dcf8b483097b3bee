"""Cost of the trackers to training: throughput with every tracker off and on, side by side.

    python -m bench.track_overhead [--smoke] [--out runs/bench/track.json]

Runs the tiny config alternately with `track:` off and with TensorBoard, W&B (offline) and
MLflow (SQLite) on, interleaved in one run (this machine is shared and noisy), and reports the
median tokens/s of each, their ratio, how long each process took from its `finished` event to
its exit (the relay's last flush and the tracker runs' closing), and whether every step reached
every tracker. The relay is another process: on a 2-core machine it competes with training for
CPU, which is what the ratio shows; it never holds a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import write_report
from telepathy.core import proc
from telepathy.core.jsonl import read_jsonl

ON = ["track.tensorboard=true", "track.wandb.mode=offline", "track.mlflow.enabled=true"]


def run(config: str, steps: int, track: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "telepathy.resume", "--config", config, "--run-dir", tmp,
               "--set", f"train.steps={steps}", "--set", "checkpoint.every_steps=0"]
        for s in ON if track else []:
            cmd += ["--set", s]
        proc.run(cmd, timeout=1800)
        ended = time.time()
        rows = list(read_jsonl(Path(tmp) / "metrics.jsonl"))[5:]
        events = list(read_jsonl(Path(tmp) / "events.jsonl"))
        finished = [e["time"] for e in events if e["event"] == "finished"]
        out = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
               "finished_to_exit_s": round(ended - finished[-1], 2) if finished else None}
        if track:
            state = json.loads((Path(tmp) / "track" / "state.json").read_text())
            out["hwm"] = {name: entry.get("hwm") for name, entry in state.items()}
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--smoke", action="store_true", help="seconds, not minutes (CI)")
    p.add_argument("--rounds", type=int, default=3, help="off/on pairs (not with --smoke)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    steps, rounds = (40, 1) if args.smoke else (600, args.rounds)
    off, on = [], []
    for _ in range(rounds):  # interleaved, so drift in machine load hits both alike
        off.append(run(args.config, steps, False))
        on.append(run(args.config, steps, True))
    median_off = statistics.median(r["tokens_per_s"] for r in off)
    median_on = statistics.median(r["tokens_per_s"] for r in on)
    report = {
        "tokens_per_s_off": [round(r["tokens_per_s"]) for r in off],
        "tokens_per_s_on": [round(r["tokens_per_s"]) for r in on],
        "throughput_ratio_on_vs_off": round(median_on / median_off, 4) if median_off else None,
        "finished_to_exit_s_off": [r["finished_to_exit_s"] for r in off],
        "finished_to_exit_s_on": [r["finished_to_exit_s"] for r in on],
        "every_step_sent": all(all(v == steps for v in r["hwm"].values()) for r in on),
        "trackers": ON, "steps": steps, "rounds": rounds,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
