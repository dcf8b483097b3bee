"""The placement planner's ZeRO-3 memory model against measured peaks, as JSON and a table.

    python -m bench.memory_model [--smoke] [--out runs/bench/memory_model.json]

- GPU: the peaks measured on an H100 (torch.cuda.max_memory_allocated, bf16, world 1;
  bench/results/h100-2026-11-23.json) against the model.
- CPU, measured here: each case runs in a fresh process at world size 1 (gloo, fp32): build the
  ZeRO-3 engine, train 3 steps, and take the peak resident memory (ru_maxrss) above the resident
  memory before the model was built; against the model's host variant (`host=True`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from bench import write_report

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
# (name, layers, hidden, intermediate, heads, kv heads, vocab, seq_len, micro)
CPU_CASES = [
    ("tiny", 2, 64, 172, 4, 2, 256, 64, 8),
    ("9M", 4, 256, 688, 4, 2, 8000, 256, 8),
    ("27M", 8, 512, 1376, 8, 4, 8000, 512, 4),
    ("60M", 8, 768, 2048, 12, 4, 32000, 512, 4),
]


def measure_cpu(case: list) -> dict:
    """Runs in its own process: peak host memory of 3 ZeRO-3 steps above the pre-build baseline."""
    import psutil

    os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported
    import torch
    import torch.nn.functional as F

    from telepathy.config import load_config
    from telepathy.engine import distributed
    from telepathy.engine.build import build_engine
    from telepathy.plan.placement import Layout

    distributed.start(0, 1, 0, "127.0.0.1", None, cuda=False)
    name, layers, hidden, inter, heads, kv, vocab, seq, micro = case
    cfg = load_config(str(ROOT / "configs/tiny-cpu.yaml"), [
        f"model.num_layers={layers}", f"model.hidden_size={hidden}",
        f"model.intermediate_size={inter}", f"model.num_heads={heads}", f"model.num_kv_heads={kv}",
        f"model.vocab_size={vocab}", f"model.max_seq_len={seq}", f"data.seq_len={seq}",
        f"train.global_batch={micro}"])
    baseline = psutil.Process().memory_info().rss
    engine = build_engine(cfg, Layout(1, micro, 1), cuda=False)
    started = time.perf_counter()
    for _ in range(3):
        ids = torch.randint(0, vocab, (micro, seq + 1))
        logits = engine(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        del logits, loss
    step_s = (time.perf_counter() - started) / 3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.distributed.destroy_process_group()
    return {"peak_above_baseline_gib": (peak - baseline) / GiB, "step_s": step_s}


def cpu_rows(cases: list) -> list[dict]:
    from telepathy.core import proc
    from telepathy.plan.memory import ModelShape, zero3_memory

    rows = []
    for case in cases:
        name, layers, hidden, inter, heads, kv, vocab, seq, micro = case
        out = proc.run([sys.executable, "-m", "bench.memory_model", "--case", json.dumps(case)],
                       timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "2"}, cwd=ROOT).stdout
        measured = json.loads(out.strip().splitlines()[-1])
        shape = ModelShape(layers, hidden, inter, heads, kv, vocab, seq)
        model = zero3_memory(shape, 1, micro, 4, host=True).peak / GiB
        rows.append({"device": "cpu", "case": name, "parameters": shape.parameters,
                     "micro_batch": micro, "seq_len": seq, "model_gib": round(model, 3),
                     "measured_gib": round(measured["peak_above_baseline_gib"], 3),
                     "error": round(model / measured["peak_above_baseline_gib"] - 1, 3),
                     "step_s": round(measured["step_s"], 3)})
    return rows


def gpu_rows() -> list[dict]:
    from telepathy.plan.memory import ModelShape, zero3_memory

    results = json.loads((ROOT / "bench/results/h100-2026-11-23.json").read_text())
    rows = []
    for run in results["runs"]:
        o = dict(x.split("=", 1) for x in run["overrides"] if x.startswith("model."))
        shape = ModelShape(int(o["model.num_layers"]), int(o["model.hidden_size"]),
                           int(o["model.intermediate_size"]), int(o["model.num_heads"]),
                           int(o["model.num_kv_heads"]), 32000, 2048, gradient_checkpointing=True)
        model = zero3_memory(shape, 1, run["micro_batch"], 2).peak / GiB
        rows.append({"device": "h100 (recorded)", "case": f"{shape.parameters / 1e6:.0f}M",
                     "parameters": shape.parameters, "micro_batch": run["micro_batch"],
                     "seq_len": 2048, "model_gib": round(model, 3),
                     "measured_gib": round(run["gpu_mem_peak_gb"], 3),
                     "error": round(model / run["gpu_mem_peak_gb"] - 1, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the tiny CPU case only (seconds)")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(measure_cpu(json.loads(args.case))))
        return 0
    rows = gpu_rows() + cpu_rows(CPU_CASES[:1] if args.smoke else CPU_CASES)
    report = {"rows": rows, "max_abs_error": max(abs(r["error"]) for r in rows)}
    for r in rows:
        print(f"{r['device']:>16} {r['case']:>6} micro {r['micro_batch']:>2}: model "
              f"{r['model_gib']:7.3f} GiB, measured {r['measured_gib']:7.3f} GiB, error "
              f"{r['error']:+.1%}", file=sys.stderr)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
