"""Resume against a cold start: process start to the first optimizer step, as JSON + a table.

    python -m bench.resume [--smoke] [--model tiny|56M] [--world 1|2] [--repeats 2] [--out F]

For each model and world size, side by side and alternating (this machine is shared and noisy):
- cold start: `python -m telepathy.resume` (torchrun for world 2) in a fresh run directory; it is
  preempted with SIGTERM after its first checkpoint and exits 75 with a preemption checkpoint;
- resume: the same command again, in that directory: it finds, verifies and loads the checkpoint
  (evicted from the page cache first, as for a resume on another node).
The synthetic corpus is made before the cold start, as real data would be prepared before it.
Each is timed from just before the process starts to the wall-clock time of its first step's
metrics line; `resume_vs_cold_start` is the median over repeats of resume / cold start. The
resume's own `verify_s` and `load_s` (its `resume` event) say where the difference goes.
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

from bench import add_case_arguments, cases_of, write_report
from bench.checkpoint import MODELS, drop_cache
from telepathy.core.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


def command(run_dir: Path, world: int, sets: list[str], config: Path = CONFIG) -> list[str]:
    launcher = [sys.executable, "-m", "telepathy.resume"]
    if world > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={world}", "-m", "telepathy.resume"]
    cmd = launcher + ["--config", str(config), "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def first_step_time(run_dir: Path, restart: int) -> float | None:
    if not (run_dir / "metrics.jsonl").exists():
        return None
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        if row.get("restart") == restart:
            return row["time"]
    return None


def events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    if not (run_dir / "events.jsonl").exists():
        return []
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == kind]


def wait_for(done: Any, p: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + 1800
    while not done():
        if p.poll() is not None and not done():  # not done, also after it ended
            raise RuntimeError(f"{what}: the process ended ({p.returncode}) first; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after 30 minutes; see {log}")
        time.sleep(0.05)


def one(model: str, world: int, base: Path) -> dict[str, Any]:
    """A cold start preempted after its first checkpoint, then its resume: both timed."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"resume-{model}-w{world}-", dir=base)) / "run"
    every = 2 if model != "tiny" else 10
    sets = [*MODELS[model], f"train.steps={every * 20}", f"checkpoint.every_steps={every}",
            "train.warmup_steps=1", "train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = open(run_dir.parent / "log.txt", "ab")
    try:
        run_dir.mkdir(parents=True)
        # The synthetic corpus, made as the run would make it: a cold start with real data
        # (data.path) makes none, and the resume finds it.
        from telepathy.config import load_config
        from telepathy.core.paths import RunPaths
        from telepathy.data.stream import generate_corpus, write_corpus
        cfg = load_config(str(CONFIG), sets)
        corpus = RunPaths.at(run_dir).synthetic_corpus(cfg.data.synthetic_tokens,
                                                       cfg.model.vocab_size, cfg.data.seed)
        corpus.parent.mkdir(parents=True, exist_ok=True)
        write_corpus(corpus, generate_corpus(cfg.data.synthetic_tokens, cfg.model.vocab_size,
                                             cfg.data.seed))
        started = time.time()
        p = subprocess.Popen(command(run_dir, world, sets), cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: events(run_dir, "checkpoint_saved"), p, "the cold start's checkpoint",
                 run_dir.parent / "log.txt")
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=600)  # 75 (torchrun exits 1 after forwarding the signal)
        if not events(run_dir, "preempted"):
            raise RuntimeError(f"the run exited {p.returncode} without a preemption save")
        cold = first_step_time(run_dir, 0) - started
        drop_cache(RunPaths.at(run_dir).checkpoints)  # as on another node: read from the disk
        started = time.time()
        p = subprocess.Popen(command(run_dir, world, sets), cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: first_step_time(run_dir, 1) is not None, p, "the resume's first step",
                 run_dir.parent / "log.txt")
        resumed = first_step_time(run_dir, 1) - started
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        resume, = events(run_dir, "resume")
        saved = [e for e in events(run_dir, "checkpoint_saved") if e["reason"] == "preemption"]
        return {"cold_start_s": round(cold, 3), "resume_s": round(resumed, 3),
                "verify_s": resume["verify_s"], "load_s": resume["load_s"],
                "checkpoint_bytes": saved[-1]["bytes"] if saved else None}
    finally:
        log.close()
        shutil.rmtree(run_dir.parent, ignore_errors=True)


def run_case(model: str, world: int, repeats: int, base: Path) -> dict[str, Any]:
    rows = [one(model, world, base) for _ in range(repeats)]
    med = {k: statistics.median(r[k] for r in rows) for k in ("cold_start_s", "resume_s",
                                                              "verify_s", "load_s")}
    ratio = statistics.median(r["resume_s"] / r["cold_start_s"] for r in rows)
    out = {"model": model, "world_size": world, "repeats": repeats,
           "checkpoint_bytes": rows[-1]["checkpoint_bytes"], "rows": rows,
           "seconds": {k: round(v, 3) for k, v in med.items()},
           "ratios": {"resume_vs_cold_start": round(ratio, 3)}}
    if ratio > 1.2:
        gap = med["resume_s"] - med["cold_start_s"]
        spread = [r["cold_start_s"] for r in rows] + [r["resume_s"] - r["verify_s"] - r["load_s"]
                                                      for r in rows]
        out["why"] = (f"the resume took {gap:.2f} s longer than a cold start; of that, its verify "
                      f"{med['verify_s']:.2f} s + load {med['load_s']:.2f} s; the rest is start-up "
                      "outside the checkpoint (imports, engine build, the first step), which "
                      f"ranged {min(spread):.2f}-{max(spread):.2f} s over these runs")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(p, list(MODELS), repeats=2)
    p.add_argument("--dir", default=str(ROOT / "runs" / "bench"), help="where the runs go")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    cases, repeats = cases_of(args, list(MODELS))
    results = [run_case(m, w, repeats, base) for m, w in cases]
    report = {"results": results}
    for r in results:
        s = r["seconds"]
        print(f"{r['model']:>5} world {r['world_size']}: cold start {s['cold_start_s']:.2f} s, "
              f"resume {s['resume_s']:.2f} s (verify {s['verify_s']:.2f} + load {s['load_s']:.2f})"
              f" -> {r['ratios']['resume_vs_cold_start']}", file=sys.stderr)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
