"""What a rank's start-up costs: CPU seconds from `python -m telepathy.resume` to the end of a
one-step run, in three arms:
- `collector_off`: as `telepathy resume` runs: the cyclic garbage collector off during start-up,
  everything frozen once the engine's libraries are imported (`freeze_imports`), the collector
  settled and back on before the first step (`settle_gc`);
- `collector_off_unfrozen`: the same without `freeze_imports` (a stand-in for the code before
  it, made by turning that function into a no-op);
- `collector_on`: on throughout (a stand-in for the code before either, made by turning
  `gc.disable` into a no-op).

    python -m bench.startup [--smoke] [--rounds 5] [--out runs/bench/startup.json]

The arms run interleaved in one invocation (this machine is shared and noisy), each a fresh
process and a fresh run directory; the report has every process's user+system CPU seconds (of
the process and its children, from `resource.getrusage`), the medians and their ratios. Every
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
ARMS = {
    "collector_off": "",
    "collector_off_unfrozen": "import telepathy.train.resume as r; r.freeze_imports = lambda: None\n",
    "collector_on": "import gc; gc.disable = lambda: None\n",
}
"""Each arm's stand-in, run before `telepathy.resume` in the same process."""


def one(config: str, arm: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one fresh one-step run."""
    code = (ARMS[arm] +
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
    arms: dict[str, dict[str, list[float]]] = {a: {"cpu_s": [], "wall_s": []} for a in ARMS}
    for _ in range(rounds):  # interleaved, so drift in machine load hits every arm alike
        for arm in arms:
            cpu, wall = one(args.config, arm)
            arms[arm]["cpu_s"].append(seconds(cpu))
            arms[arm]["wall_s"].append(seconds(wall))
    medians = {arm: statistics.median(v["cpu_s"]) for arm, v in arms.items()}
    report = {
        "config": args.config, "rounds": rounds, "runs": arms,
        "median_cpu_s": {arm: seconds(m) for arm, m in medians.items()},
        "cpu_saved_s": seconds(medians["collector_on"] - medians["collector_off"]),
        "freeze_saved_s": seconds(medians["collector_off_unfrozen"] - medians["collector_off"]),
    }
    not_measured = {}
    # Only from a non-zero denominator; otherwise not measured, and why.
    for key, num, den in (("cpu_ratio_off_vs_on", "collector_off", "collector_on"),
                          ("cpu_ratio_frozen_vs_unfrozen", "collector_off",
                           "collector_off_unfrozen")):
        ok = medians[den] > 0
        report[key] = round(medians[num] / medians[den], 4) if ok else None
        if not ok:
            not_measured[key] = f"the {den} run reported no CPU time"
    if not_measured:
        report["not_measured"] = not_measured
    write_report(report, args.out)
    print(f"start-up CPU, median of {rounds}: " +
          ", ".join(f"{arm} {m:.2f} s" for arm, m in medians.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
