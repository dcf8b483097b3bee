"""`python -m bench.train_step --peer deepspeed`: telepathy's training step against the bare
DeepSpeed loop (bench/bare_loop.py), the same model, batches, steps and checkpoint interval.

Each arm is a fresh set of processes (one rank, or torchrun with two), `OMP_NUM_THREADS=1` unless
set, in a fresh directory; the arms alternate within a repeat, the first arm alternating by
repeat. Throughput is end to end: the tokens of steps `WARM + 1 .. steps` over the wall time from
the end of step WARM to the end of the last step, so the checkpoints within (the stall, and a
background write's competition for the CPU) count; start-up and the final save do not. telepathy
runs as configured (its asynchronous checkpoints, the in-job monitor, trackers as the config
says: off by default); the bare loop saves with DeepSpeed's `save_checkpoint` (no fsync).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import ratios, seconds, write_report

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
MODELS = {
    "tiny": [],  # configs/tiny-cpu.yaml: 64 wide, 2 layers, vocabulary 256, seq_len 64
    # bench.sft's: the smallest model whose step time is compute's on this CPU, not Python's
    "1.3M": ["model.hidden_size=128", "model.intermediate_size=344", "model.num_layers=4",
             "model.num_heads=4", "model.num_kv_heads=2", "model.vocab_size=2048",
             "model.max_seq_len=256", "data.seq_len=256"],
}
WARM = 3
"""Steps left out of the throughput at the start (the first steps allocate and warm caches)."""
TARGET = ("telepathy_vs_bare_tokens_per_s", ">=", 0.98)


def launcher(world: int, module: str) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", module]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world}", "-m", module]


def throughput(times: list[float], tokens_per_step: int) -> float | None:
    """End-to-end tokens/s over the steps after WARM (times: the wall clock at each step's end)."""
    if len(times) <= WARM + 1:
        return None
    span = times[-1] - times[WARM - 1]
    return (len(times) - WARM) * tokens_per_step / span if span > 0 else None


def run_arm(arm: str, world: int, sets: list[str], work: Path, tokens_per_step: int) -> dict:
    """One fresh run of one arm; its throughput, losses and wall time."""
    from telepathy.core import proc
    from telepathy.core.jsonl import read_jsonl
    from telepathy.core.paths import RunPaths

    out = work / arm
    out.mkdir(parents=True)
    args = [f"--set={s}" for s in sets]
    if arm == "telepathy":
        cmd = launcher(world, "telepathy.resume") + ["--config", str(CONFIG), "--run-dir",
                                                     str(out), *args]
    else:
        cmd = launcher(world, "bench.bare_loop") + ["--config", str(CONFIG), "--out-dir",
                                                    str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    proc.run(cmd, timeout=3600, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    rows = list(read_jsonl(RunPaths.at(out).metrics if arm == "telepathy" else out / "steps.jsonl"))
    if arm == "telepathy":
        saves = sum(1 for e in read_jsonl(RunPaths.at(out).events)
                    if e.get("event") == "checkpoint_saved")
    else:
        saves = len(list((out / "checkpoints").glob("step*")))
    rate = throughput([r["time"] for r in rows], tokens_per_step)
    return {"tokens_per_s": round(rate, 1) if rate else None, "steps": len(rows),
            "checkpoints": saves, "process_wall_s": seconds(wall),
            "first_loss": rows[0]["loss"] if rows else None,
            "last_loss": rows[-1]["loss"] if rows else None}


def run_case(model: str, world: int, steps: int, every: int, repeats: int, base: Path) -> dict:
    from telepathy.config import load_config
    from telepathy.train.inputs import make_plan

    sets = [*MODELS[model], f"train.steps={steps}", f"checkpoint.every_steps={every}"]
    cfg = load_config(str(CONFIG), sets)
    layout = make_plan(cfg, world, gpu_mem_gib=None).layout
    tokens_per_step = layout.global_batch * cfg.data.seq_len
    runs: dict[str, list[dict]] = {"telepathy": [], "bare": []}
    for i in range(repeats):
        order = ["telepathy", "bare"] if i % 2 == 0 else ["bare", "telepathy"]
        for arm in order:
            work = Path(tempfile.mkdtemp(prefix=f"step-{arm}-", dir=base))
            try:
                runs[arm].append(run_arm(arm, world, sets, work, tokens_per_step))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"{model} world {world} repeat {i + 1} {arm}: {runs[arm][-1]}", file=sys.stderr)
    med = {arm: statistics.median([r["tokens_per_s"] or 0.0 for r in rs])
           for arm, rs in runs.items()}
    measured, not_measured = ratios({TARGET[0]: (med["telepathy"], med["bare"])})
    value = measured[TARGET[0]]
    target = {"value": value, "target": f"{TARGET[1]} {TARGET[2]}",
              "met": None if value is None else value >= TARGET[2]}
    if value is None:
        target["why"] = not_measured[TARGET[0]]
    elif not target["met"]:
        target["why"] = (f"telepathy {med['telepathy']:.0f} against the bare loop "
                         f"{med['bare']:.0f} tokens/s end to end, {len(runs['telepathy'])} runs "
                         "each: see the runs' figures")
    return {"model": model, "world_size": world, "steps": steps, "every_steps": every,
            "warm_steps": WARM, "micro_batch": layout.micro_batch, "accum": layout.accum,
            "global_batch": layout.global_batch, "seq_len": cfg.data.seq_len,
            "repeats": repeats, "tokens_per_s": med, "runs": runs,
            "ratios": measured, "not_measured": not_measured, "targets": {TARGET[0]: target}}


def run_peer(args: argparse.Namespace) -> int:
    if args.smoke:
        cases, steps, every, repeats = [("tiny", 1)], 20, 10, 1
    else:
        worlds = [args.world] if args.world else [1, 2]
        cases = [(args.model or "1.3M", w) for w in worlds]
        steps, every, repeats = args.steps or 100, args.every_steps, args.repeats
    base = ROOT / "runs" / "bench"
    base.mkdir(parents=True, exist_ok=True)
    results = [run_case(m, w, steps, every, repeats, base) for m, w in cases]
    for r in results:
        print(f"{r['model']} world {r['world_size']}: tokens/s {r['tokens_per_s']} | "
              f"ratios {r['ratios']}", file=sys.stderr)
    write_report({"peer": "deepspeed", "results": results}, args.out)
    return 0

