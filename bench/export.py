"""Peak memory of `telepathy export` against DeepSpeed's plain (non-lazy) zero_to_fp32.

    python -m bench.export [--smoke] [--model tiny|56M] [--shard-size 100MB] [--out F]

Makes a one-step run of the model (world 1, its checkpoint saved), then runs, each as its own
process whose /proc status is sampled every 10 ms:
  - telepathy export (lazy zero_to_fp32: memory-mapped files, one parameter, one shard at a time);
  - plain: get_fp32_state_dict_from_zero_checkpoint then one safetensors save_file (the usual
    recipe).
Peaks are reported as RSS, anonymous memory (RssAnon: what cannot be given back) and file-backed
memory (RssFile: pages of the memory-mapped checkpoint, page cache the kernel reclaims). The
tiny model runs first: each program's peak on it is that program's fixed cost (imports), and
what the large model adds above it is compared with the size of its weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.checkpoint import MODELS

ROOT = Path(__file__).resolve().parents[1]


def peak_memory(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run a command; its wall time and the peaks of VmRSS, RssAnon and RssFile (bytes)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peaks = {"rss": 0, "anon": 0, "file": 0}
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}

    def sample():
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    field = line.split()
                    if field and field[0] in keys:
                        peaks[keys[field[0]]] = max(peaks[keys[field[0]]], int(field[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
            time.sleep(0.01)

    started = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {err.decode()[-2000:]}")
    return {**peaks, "seconds": round(time.perf_counter() - started, 3)}


def make_run(model: str, run_dir: Path) -> None:
    sets = [*MODELS[model], "train.steps=1", "train.warmup_steps=0", "checkpoint.every_steps=0",
            "monitor.interval_s=0", "train.global_batch=2"]
    cmd = [sys.executable, "-m", "telepathy.resume", "--config", str(ROOT / "configs/tiny-cpu.yaml"),
           "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, capture_output=True, timeout=1800,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


PLAIN = """
import sys
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
state = get_fp32_state_dict_from_zero_checkpoint(sys.argv[1], tag=sys.argv[2])
save_file({k: v.contiguous() for k, v in state.items()}, sys.argv[3])
"""


def run(model: str, shard_size: str, base: Path) -> dict:
    """One model: its checkpoint, and the peaks of both programs exporting it."""
    from safetensors import safe_open

    from telepathy.checkpoint import directory
    from telepathy.core.paths import RunPaths

    run_dir = base / "run"
    make_run(model, run_dir)
    paths = RunPaths.at(run_dir)
    ckpt = paths.checkpoint(directory.complete_steps(paths.checkpoints)[-1])
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    export = peak_memory([sys.executable, "-m", "telepathy", "export", str(run_dir), "--out",
                          str(base / "export"), "--shard-size", shard_size], env)
    plain = peak_memory([sys.executable, "-c", PLAIN, str(ckpt.parent), ckpt.name,
                         str(base / "plain.safetensors")], env)
    numels = []
    for shard in sorted((base / "export").glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            numels += [math.prod(f.get_slice(k).get_shape()) for k in f.keys()]
    shard_files = [p.stat().st_size for p in (base / "export").glob("*.safetensors")]
    return {"model": model, "world_size": 1,
            "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()),
            "fp32_weight_bytes": 4 * sum(numels), "largest_tensor_bytes": 4 * max(numels),
            "largest_shard_bytes": max(shard_files), "shards": len(shard_files),
            "peaks": {"telepathy_export": export, "plain_zero_to_fp32": plain}}


def compare(small: dict, large: dict) -> dict:
    """What exporting the large model costs above each program's own fixed cost (its peak on
    the small model): anonymous memory, against the weights' size."""
    out = {}
    for program in ("telepathy_export", "plain_zero_to_fp32"):
        extra = large["peaks"][program]["anon"] - small["peaks"][program]["anon"]
        out[program] = {"anon_above_fixed_bytes": extra,
                        "vs_fp32_weights": round(extra / large["fp32_weight_bytes"], 3)}
    out["export_vs_plain"] = round(out["telepathy_export"]["anon_above_fixed_bytes"]
                                   / max(out["plain_zero_to_fp32"]["anon_above_fixed_bytes"], 1), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the tiny model")
    p.add_argument("--model", choices=list(MODELS), default="56M")
    p.add_argument("--shard-size", default="100MB")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    (ROOT / "runs").mkdir(exist_ok=True)
    models = ["tiny"] if args.smoke else ["tiny", args.model]
    results = []
    for model in models:
        with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
            results.append(run(model, "200KB" if model == "tiny" else args.shard_size, Path(tmp)))
    result = {"results": results}
    if len(results) == 2:
        result["above_fixed_cost"] = compare(*results)
    print(json.dumps(result, indent=1))
    mb = 1e6
    for r in results:
        peaks = r["peaks"]
        print(f"{r['model']}: {r['fp32_weight_bytes'] / mb:.0f} MB of fp32 weights in {r['shards']} "
              f"shard(s) (largest {r['largest_shard_bytes'] / mb:.0f} MB, largest tensor "
              f"{r['largest_tensor_bytes'] / mb:.0f} MB); peak anon / file-backed: export "
              f"{peaks['telepathy_export']['anon'] / mb:.0f} / "
              f"{peaks['telepathy_export']['file'] / mb:.0f} MB, plain zero_to_fp32 "
              f"{peaks['plain_zero_to_fp32']['anon'] / mb:.0f} / "
              f"{peaks['plain_zero_to_fp32']['file'] / mb:.0f} MB", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
