"""LoRA against full fine-tuning of the same pretrained model: checkpoint bytes, save time,
resume time and steps/s, as JSON + a table.

    python -m bench.finetune [--smoke] [--model tiny|56M] [--world 1|2] [--steps 20] [--out F]

The base: a model of `--model`'s shape (bench.checkpoint's MODELS) built with its seed and saved
with `save_pretrained`, as a user's local directory holds one. On it, side by side in one run
(this machine is shared and noisy), each mode runs the same command, `python -m telepathy.resume`
(torchrun for world 2) with model.pretrained_path set:
- full: every parameter trains (model.lora.r=0);
- lora: the base frozen, rank-8 adapters on the attention projections (model.lora.r=8).
Each run saves a checkpoint halfway, is preempted with SIGTERM after it (its preemption save),
and resumes from the page-cache-evicted checkpoint: `resume_s` is process start to the resumed
run's first step. Figures: the checkpoints' bytes and save `seconds` (snapshot to durable
manifest, the median of the run's saves), the resume's verify and load, and steps/s (median step
time of the first allocation). `ratios` are lora / full; the target is checkpoint bytes <= 0.05.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import add_case_arguments, cases_of, ratios, seconds, write_report
from bench.checkpoint import MODELS, drop_cache
from bench.resume import command, events, first_step_time, wait_for
from telepathy.checkpoint.manifest import MANIFEST
from telepathy.core.jsonl import read_jsonl
from telepathy.core.paths import RunPaths

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-lora-cpu.yaml"
MODES = {"full": ["model.lora.r=0"], "lora": ["model.lora.r=8"]}
TARGET_BYTES_RATIO = 0.05


def save_base(model: str, out: Path) -> int:
    """The pretrained model of this shape, saved; its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    from telepathy.config import load_config
    from telepathy.engine import adapter
    from telepathy.engine.build import model_config

    adapter.use_cpu_accelerator()  # else DeepSpeed, imported by transformers, probes and prints
    cfg = load_config(str(ROOT / "configs" / "tiny-cpu.yaml"), MODELS[model])
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(model_config(cfg, torch.float32))
    net.save_pretrained(out)
    return sum(p.numel() for p in net.parameters())


def one(mode: str, model: str, world: int, steps: int, base_dir: Path, work: Path
        ) -> dict[str, Any]:
    """One mode: a run preempted after its halfway checkpoint, then resumed; both timed."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"finetune-{mode}-", dir=work)) / "run"
    run_dir.mkdir(parents=True)
    half = max(1, steps // 2)
    shape = [s for s in MODELS[model] if s.startswith(("data.", "model.max_seq_len"))]
    sets = [*shape, *MODES[mode], f"model.pretrained_path={base_dir}", f"train.steps={steps}",
            f"checkpoint.every_steps={half}", "train.warmup_steps=1", "train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # The step after the halfway checkpoint waits 5 s before it starts (outside its timing), so
    # that the SIGTERM sent once that checkpoint is durable finds the run still going.
    held = {**env, "TELEPATHY_FAULT": f"step.start@{half + 1},sleep=5"}
    log_path = run_dir.parent / "log.txt"
    with open(log_path, "ab") as log:
        p = subprocess.Popen(command(run_dir, world, sets, CONFIG), cwd=ROOT, env=held, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        manifest = RunPaths.at(run_dir).checkpoint(half) / MANIFEST
        wait_for(manifest.exists, p, f"{mode}: the checkpoint of step {half}", log_path)
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=600)  # 75 (torchrun exits 1 after forwarding the signal)
        if not events(run_dir, "preempted"):
            raise RuntimeError(f"{mode}: the run exited {p.returncode} without a preemption "
                               f"save; see {log_path}")
        step_times = [r["step_time_s"] for r in read_jsonl(run_dir / "metrics.jsonl")
                      if r["restart"] == 0 and 1 < r["step"] <= half]
        drop_cache(run_dir / "checkpoints")  # as on another node: read from the disk
        started = time.time()
        p = subprocess.Popen(command(run_dir, world, sets, CONFIG), cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: first_step_time(run_dir, 1) is not None, p, f"{mode}: the resume",
                 log_path)
        resumed = first_step_time(run_dir, 1) - started
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    saves = events(run_dir, "checkpoint_saved")
    resume, = events(run_dir, "resume")
    launch = [e for e in events(run_dir, "start")]
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    return {"checkpoint_bytes": max(e["bytes"] for e in saves),
            "save_s": seconds(statistics.median(e["seconds"] for e in saves)),
            "resume_s": seconds(resumed), "verify_s": resume["verify_s"],
            "load_s": resume["load_s"],
            "steps_per_s": round(1 / statistics.median(step_times), 3) if step_times else None,
            "parameters": launch[0]["parameters"] if launch else None}


def run_case(model: str, world: int, steps: int, work: Path) -> dict[str, Any]:
    base_dir = work / f"base-{model}"
    parameters = save_base(model, base_dir)
    try:
        rows = {mode: one(mode, model, world, steps, base_dir, work) for mode in MODES}
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    full, lora = rows["full"], rows["lora"]
    got, not_measured = ratios({
        "checkpoint_bytes": (lora["checkpoint_bytes"], full["checkpoint_bytes"]),
        "save_s": (lora["save_s"], full["save_s"]),
        "resume_s": (lora["resume_s"], full["resume_s"]),
        "steps_per_s": (lora["steps_per_s"] or float("nan"), full["steps_per_s"] or float("nan")),
    })
    out = {"model": model, "world_size": world, "steps": steps, "base_parameters": parameters,
           "full": full, "lora": lora, "ratios": got,
           "targets": {"checkpoint_bytes_ratio_at_most": TARGET_BYTES_RATIO,
                       "met": (got["checkpoint_bytes"] is not None
                               and got["checkpoint_bytes"] <= TARGET_BYTES_RATIO)}}
    if not_measured:
        out["not_measured"] = not_measured
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(p, list(MODELS), repeats=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dir", default=str(ROOT / "runs" / "bench"), help="where the runs go")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    cases, _ = cases_of(args, list(MODELS))
    steps = 4 if args.smoke else args.steps
    results = [run_case(m, w, steps, work) for m, w in cases]
    for r in results:
        f, lo, q = r["full"], r["lora"], r["ratios"]
        print(f"{r['model']:>5} world {r['world_size']}: checkpoint {f['checkpoint_bytes'] / 1e6:.2f}"
              f" -> {lo['checkpoint_bytes'] / 1e6:.3f} MB ({q['checkpoint_bytes']}), save "
              f"{f['save_s']} -> {lo['save_s']} s, resume {f['resume_s']} -> {lo['resume_s']} s, "
              f"{f['steps_per_s']} -> {lo['steps_per_s']} steps/s", file=sys.stderr)
    write_report({"results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
