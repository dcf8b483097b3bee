"""Drive real training processes: start, signal, kill, and read what they wrote."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from telepathy.jsonl import last_per_step, read_jsonl, wait_for_step
from telepathy.paths import RunPaths

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny-cpu.yaml")
# Short runs for tests: 60 steps, a checkpoint every 20.
SETS = ["train.steps=60", "checkpoint.every_steps=20", "train.log_every=20"]
TIMEOUT_S = 300

_seed = int(os.environ.get("TELEPATHY_TEST_SEED", time.time_ns() % 2**31))
print(f"TELEPATHY_TEST_SEED={_seed}", file=sys.stderr)
RNG = random.Random(_seed)


def command(run_dir: Path, world: int = 1, sets: list[str] = (), extra: list[str] = ()) -> list[str]:
    launcher = [sys.executable, "-m", "telepathy.resume"]
    if world > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={world}", "-m", "telepathy.resume"]
    cmd = launcher + ["--config", CONFIG, "--run-dir", str(run_dir)]
    for s in [*SETS, *sets]:
        cmd += ["--set", s]
    return cmd + list(extra)


def start(run_dir: Path, world: int = 1, sets: list[str] = (), env: dict | None = None,
          extra: list[str] = ()) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    return subprocess.Popen(command(run_dir, world, sets, extra), stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True)


def finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def run(run_dir: Path, world: int = 1, sets: list[str] = (), env: dict | None = None,
        extra: list[str] = ()) -> int:
    return finish(start(run_dir, world, sets, env, extra))


def interrupt(run_dir: Path, after_step: int, world: int = 1, sets: list[str] = (),
              env: dict | None = None) -> tuple[int, int]:
    """Start (or resume) a run, send SIGTERM once it logged `after_step`; return (rc, step seen).

    The step waited for is one this process logs itself (past any step already in the file).
    """
    logged = [r["step"] for r in metrics(run_dir)] if run_dir.exists() else []
    after_step = max([after_step, *(s + 1 for s in logged)])
    proc = start(run_dir, world, sets, env)
    seen = wait_for_step(RunPaths.at(run_dir).metrics, after_step, TIMEOUT_S,
                         lambda: proc.poll() is None)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
    return finish(proc), seen


def losses(run_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in last_per_step(list(read_jsonl(RunPaths.at(run_dir).metrics))).items()}


def metrics(run_dir: Path) -> list[dict]:
    return list(read_jsonl(RunPaths.at(run_dir).metrics))


def events(run_dir: Path, name: str | None = None) -> list[dict]:
    return [e for e in read_jsonl(RunPaths.at(run_dir).events) if name in (None, e.get("event"))]


def log_text(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")
