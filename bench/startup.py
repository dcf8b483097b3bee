"""What a rank's start-up costs: CPU seconds from `python -m telepathy.resume` to the end of a
one-step run, with the cyclic garbage collector off during start-up (as `telepathy resume` runs)
and on throughout (a stand-in for the code before, made by turning `gc.disable` into a no-op).

    python -m bench.startup [--smoke] [--rounds 5] [--out runs/bench/startup.json]

Both arms run interleaved in one invocation (this machine is shared and noisy), each a fresh
process and a fresh run directory; the report has every process's user+system CPU seconds (of
the process and its children, from `resource.getrusage`), the medians and their ratio. Every
process in the test suite and every requeued allocation pays this start-up once per rank.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from bench import seconds, write_report

STEPS = ["--set", "train.steps=1", "--set", "train.warmup_steps=0",
         "--set", "checkpoint.every_steps=0", "--set", "monitor.interval_s=0"]
COLLECTOR_ON = "import gc; gc.disable = lambda: None\n"
"""The "before" arm: `telepathy resume` as it was, the collector left on during start-up."""


def one(config: str, collector_on: bool) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one fresh one-step run."""
    code = ((COLLECTOR_ON if collector_on else "") +
            "import runpy, sys; sys.argv[0] = 'telepathy.resume'\n"
            "runpy.run_module('telepathy.resume', run_name='__main__', alter_sys=True)\n")
    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, "--config", config, "--run-dir", tmp,
                               *STEPS], capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"the one-step run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--smoke", action="store_true", help="one round (CI)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args(argv)
    rounds = 1 if args.smoke else args.rounds
    arms: dict[str, dict[str, list[float]]] = {a: {"cpu_s": [], "wall_s": []}
                                               for a in ("collector_off", "collector_on")}
    for _ in range(rounds):  # interleaved, so drift in machine load hits both alike
        for arm in arms:
            cpu, wall = one(args.config, collector_on=arm == "collector_on")
            arms[arm]["cpu_s"].append(seconds(cpu))
            arms[arm]["wall_s"].append(seconds(wall))
    medians = {arm: statistics.median(v["cpu_s"]) for arm, v in arms.items()}
    on = medians["collector_on"]
    report = {
        "config": args.config, "rounds": rounds, "runs": arms,
        "median_cpu_s": {arm: seconds(m) for arm, m in medians.items()},
        # Only from a non-zero denominator; otherwise not measured, and why.
        "cpu_ratio_off_vs_on": round(medians["collector_off"] / on, 4) if on > 0 else None,
        "cpu_saved_s": seconds(on - medians["collector_off"]),
    }
    if on <= 0:
        report["not_measured"] = "the collector-on run reported no CPU time"
    write_report(report, args.out)
    print(f"start-up CPU, median of {rounds}: collector off {medians['collector_off']:.2f} s, "
          f"on {on:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
