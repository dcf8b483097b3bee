"""Throughput, peak memory and checkpoint save figures of a short real run, as JSON.

    python -m bench.train_step --config configs/llama-1b-h100.yaml --steps 30 \
        --set checkpoint.every_steps=15 --out runs/bench/train_step.json

Runs `python -m telepathy.resume` in a fresh run directory (as one process, or under torchrun
with --nproc N) and summarises its metrics.jsonl and events.jsonl.

    python -m bench.train_step --peer deepspeed [--smoke] [--model tiny|1.3M] [--world 1|2]
                               [--steps 100] [--repeats 3] [--out F]

With `--peer deepspeed`: the same model, batches, steps and checkpoint interval once through
telepathy and once as the plain DeepSpeed loop a user would write (bench/bare_loop.py), fresh
processes, interleaved (the order alternates by repeat); throughput end to end (bench/peer_step.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from telepathy.core import proc
from telepathy.core.jsonl import read_jsonl
from telepathy.core.paths import RunPaths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", choices=["deepspeed"], help="against the bare DeepSpeed loop")
    p.add_argument("--smoke", action="store_true", help="with --peer: tiny, world 1, one repeat")
    p.add_argument("--model", choices=["tiny", "1.3M"], help="with --peer (default: 1.3M)")
    p.add_argument("--world", type=int, choices=[1, 2], help="with --peer (default: 1 and 2)")
    p.add_argument("--repeats", type=int, default=3, help="with --peer")
    p.add_argument("--every-steps", type=int, default=50, help="with --peer: checkpoint interval")
    p.add_argument("--config", help="the run's config (default with --peer: tiny-cpu.yaml)")
    p.add_argument("--steps", type=int, default=None, help="default: 30 (with --peer: 100)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", default=None, help="JSON file to write (default: stdout only)")
    p.add_argument("--run-dir", default=None, help="default: a temporary directory, removed after")
    p.add_argument("--resume-steps", type=int, default=0,
                   help="then resume the finished run for this many more steps (--force), to time "
                        "the verified load of its last checkpoint")
    args = p.parse_args(argv)
    if args.peer or args.smoke:
        from bench.peer_step import run_peer
        return run_peer(args)
    if not args.config:
        p.error("--config is required (or --peer deepspeed)")
    args.steps = args.steps or 30
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="telepathy-bench-"))
    launcher = [sys.executable, "-m", "telepathy.resume"]
    if args.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={args.nproc}", "-m", "telepathy.resume"]
    cmd = launcher + ["--config", args.config, "--run-dir", str(run_dir),
                      "--set", f"train.steps={args.steps}"]
    for s in args.set:
        cmd += ["--set", s]
    started = time.time()
    result = proc.run(cmd, timeout=3600, check=False)
    if result.returncode == 0 and args.resume_steps:
        cmd = cmd + ["--set", f"train.steps={args.steps + args.resume_steps}", "--force"]
        result = proc.run(cmd, timeout=3600, check=False)
    wall = time.time() - started
    paths = RunPaths.at(run_dir)
    metrics = list(read_jsonl(paths.metrics))
    events = list(read_jsonl(paths.events))
    saves = [e for e in events if e.get("event") == "checkpoint_saved"]
    warm = metrics[min(3, len(metrics) - 1):] if metrics else []
    start = next((e for e in events if e.get("event") == "start"), {})
    launch = next((e for e in events if e.get("event") == "launch"), {})
    report = {
        "config": args.config, "overrides": args.set, "steps": len(metrics), "exit_code": result.returncode,
        "wall_s": round(wall, 1), "parameters": start.get("parameters"),
        "device": launch.get("device"), "world_size": launch.get("world_size"),
        "micro_batch": launch.get("micro_batch"), "accum": launch.get("accum"),
        "step_time_s_median": statistics.median(r["step_time_s"] for r in warm) if warm else None,
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in warm) if warm else None,
        "gpu_mem_peak_gb": max((r.get("gpu_mem_peak_gb", 0) for r in metrics), default=None),
        "first_loss": metrics[0]["loss"] if metrics else None,
        "last_loss": metrics[-1]["loss"] if metrics else None,
        "saves": [{"step": e["step"], "bytes": e["bytes"], "seconds": e["seconds"],
                   "GB_per_s": round(e["bytes"] / 1e9 / e["seconds"], 3),
                   **{k: e[k] for k in ("reason", "stall_s", "write_s", "persist_s") if k in e}}
                  for e in saves],
        "resumes": [{k: e.get(k) for k in ("step", "verify_s", "load_s")}
                    for e in events if e.get("event") == "resume"],
    }
    if result.returncode != 0:
        report["stderr_tail"] = result.stderr[-3000:]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if not args.run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
