"""Cost of the GPU/host sampler: time per sample, and training throughput with it off and on.

    python -m bench.monitor_overhead [--smoke] [--out runs/bench/monitor.json]

Runs the tiny config alternately with `monitor.interval_s=0` (off) and a deliberately
aggressive interval, side by side in one run (this machine is shared and noisy), and reports
the median tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import write_report
from telepathy.core import proc
from telepathy.core.jsonl import read_jsonl
from telepathy.watch.monitor import SystemMonitor, _Gpus


def per_sample_ms(samples: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        monitor = SystemMonitor(Path(tmp) / "s.jsonl", Path(tmp), interval_s=1.0)
        gpus = _Gpus()
        monitor.sample(gpus)
        started = time.perf_counter()
        for _ in range(samples):
            monitor.sample(gpus)
        return (time.perf_counter() - started) / samples * 1000


def run(config: str, steps: int, interval_s: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "telepathy.resume", "--config", config, "--run-dir", tmp,
               "--set", f"train.steps={steps}", "--set", "checkpoint.every_steps=0",
               "--set", f"monitor.interval_s={interval_s}"]
        proc.run(cmd, timeout=1800)
        rows = list(read_jsonl(Path(tmp) / "metrics.jsonl"))[5:]
        return statistics.median(r["tokens_per_s"] for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--smoke", action="store_true", help="seconds, not minutes (CI)")
    p.add_argument("--interval", type=float, default=0.5, help="sampler interval when on")
    p.add_argument("--out")
    args = p.parse_args(argv)
    steps, rounds = (60, 1) if args.smoke else (300, 2)
    off, on = [], []
    for _ in range(rounds):  # interleaved, so drift in machine load hits both alike
        off.append(run(args.config, steps, 0))
        on.append(run(args.config, steps, args.interval))
    ms = per_sample_ms(20 if args.smoke else 200)
    report = {
        "sample_ms": round(ms, 3),
        "sampler_busy_fraction_at_10s": round(ms / 1000 / 10, 6),
        "sampler_busy_fraction_at_interval": round(ms / 1000 / args.interval, 6),
        "tokens_per_s_off": [round(x) for x in off], "tokens_per_s_on": [round(x) for x in on],
        "interval_s_on": args.interval,
        "throughput_ratio_on_vs_off": round(statistics.median(on) / statistics.median(off), 4),
        "steps": steps, "rounds": rounds,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
