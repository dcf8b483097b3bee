"""The checkpoint mirror's cost to training, and an outage of its server, side by side.

    python -m bench.mirror [--smoke] [--outage-s 60] [--rounds 2] [--out bench/results/x.json]

Runs the tiny config with a checkpoint every 10 steps, alternately without a mirror and with one
(moto's standalone S3 server on 127.0.0.1, reached through s3fs), interleaved (this machine is
shared and noisy). In every mirrored run the server is stopped (SIGSTOP: it keeps its objects and
answers nothing, a hung server) for --outage-s seconds, a third of the way in, then let go on.
Reported per run: the median step time before, during and after the outage and of the run
without a mirror (their ratios), the mirror_failed events, how long after the server came back
the mirror had the newest checkpoint again, what was uploaded, and that no checkpoint without a
manifest ever counted there.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import ratios, seconds, write_report
from telepathy.core.jsonl import read_jsonl
from tests.support import FAST_MIRROR, S3Server

ROOT = Path(__file__).resolve().parents[1]


def median_step(rows: list[dict], lo: float = float("-inf"), hi: float = float("inf")) -> float | None:
    """The median step time of the rows logged between `lo` and `hi` (None: no such row)."""
    times = [r["step_time_s"] for r in rows if lo <= r["time"] <= hi]
    return seconds(statistics.median(times)) if times else None


def run(root: Path, steps: int, server: S3Server | None, outage_s: float) -> dict:
    import subprocess

    run_dir = Path(tempfile.mkdtemp(dir=root)) / "run"
    cmd = [sys.executable, "-m", "telepathy.resume", "--config", "configs/tiny-cpu.yaml",
           "--run-dir", str(run_dir), "--set", f"train.steps={steps}",
           "--set", "checkpoint.every_steps=10", "--set", "train.log_every=1000"]
    env = dict(os.environ)
    url = None
    if server is not None:
        url = f"s3://{server.bucket()}/bench"
        cmd += ["--set", f"checkpoint.mirror={url}", "--set", "checkpoint.mirror_keep=2",
                "--set", FAST_MIRROR]
        env.update(server.env)
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(run_dir.parent / "log", "wb"))
    paused = resumed = None
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        time.sleep(0.1)
        if server is None or resumed is not None or not metrics.exists():
            continue
        done = sum(1 for _ in read_jsonl(metrics))
        if paused is None and done >= steps // 3:
            server.pause()
            paused = time.time()
        elif paused is not None and time.time() >= paused + outage_s:
            server.resume()
            resumed = time.time()
    if paused is not None and resumed is None:
        server.resume()
        resumed = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}): {(run_dir.parent / 'log').read_text()[-2000:]}")
    rows = list(read_jsonl(metrics))[3:]
    events = list(read_jsonl(run_dir / "events.jsonl"))
    out = {"seconds": seconds(time.time() - started), "step_s": median_step(rows)}
    if server is None:
        return out
    from telepathy.checkpoint import mirror

    uploads = [e for e in events if e["event"] == "mirror_uploaded"]
    failed = [e for e in events if e["event"] == "mirror_failed"]
    newest = max(r["step"] for r in rows) // 10 * 10
    caught_up = [e["time"] for e in uploads if e["time"] >= resumed]
    store = mirror.open_store(url)  # this process has the server's variables too
    out.update({
        "outage_s": seconds(resumed - paused),
        "step_s_before": median_step(rows, hi=paused),
        "step_s_during": median_step(rows, paused, resumed),
        "step_s_after": median_step(rows, lo=resumed),
        "step_s_max_during": seconds(max((r["step_time_s"] for r in rows
                                          if paused <= r["time"] <= resumed), default=0.0)),
        "steps_during": sum(1 for r in rows if paused <= r["time"] <= resumed),
        "mirror_failed_events": len(failed),
        "first_failure_after_s": seconds(failed[0]["time"] - paused) if failed else None,
        "caught_up_after_s": seconds(caught_up[0] - resumed) if caught_up else None,
        "uploads": len(uploads),
        "uploaded_MB_per_s": seconds(statistics.median(e["bytes"] / 1e6 / max(e["seconds"], 1e-6)
                                                       for e in uploads)) if uploads else None,
        "mirrored_steps": [s for s, _, _ in store.complete()],
        "prefixes": [s for s, _ in store.names()],
        "newest_trained_checkpoint": newest})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="seconds, not minutes (CI)")
    p.add_argument("--outage-s", type=float, default=60.0)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--rounds", type=int, default=2, help="without/with pairs")
    p.add_argument("--out")
    args = p.parse_args(argv)
    steps, rounds, outage = (60, 1, 3.0) if args.smoke else (args.steps, args.rounds,
                                                              args.outage_s)
    with tempfile.TemporaryDirectory() as tmp:
        server = S3Server(Path(tmp) / "s3")
        os.environ.update(server.env)
        try:
            plain, mirrored = [], []
            for _ in range(rounds):  # interleaved
                if not args.smoke:  # the smoke checks the mirrored run's report only
                    plain.append(run(Path(tmp), steps, None, outage))
                mirrored.append(run(Path(tmp), steps, server, outage))
        finally:
            server.stop()
    def med(runs: list[dict], key: str) -> float:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else math.nan
    computed, why = ratios({
        "during_outage_vs_before": (med(mirrored, "step_s_during"), med(mirrored, "step_s_before")),
        "mirrored_vs_no_mirror_step": (med(mirrored, "step_s"), med(plain, "step_s"))})
    if args.smoke:
        why["mirrored_vs_no_mirror_step"] = "not measured: the smoke runs no run without a mirror"
    report = {"steps": steps, "outage_s": outage, "rounds": rounds, "no_mirror": plain,
              "mirror": mirrored, "ratios": computed, "not_measured": why,
              "complete_only_with_manifest": all(r["mirrored_steps"] == r["prefixes"]
                                                 for r in mirrored)}
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
