"""`telepathy demo` (`python -m telepathy.demo`): show a preemption and an exact resume on the
embedded default.

Starts the local single-node SLURM cluster (slurm/local/up.sh), submits the tiny config with
`sbatch slurm/preemptible.slurm` on 2 of its fake H100s once to the end, then once more and
sends it `scancel -s TERM` part-way: the job saves, requeues itself under the same job id,
resumes, and finishes. Every step's loss after the resume is compared, bit for bit.
`--local` does the same without SLURM (one process, SIGTERM, same command again).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from .config import load_config
from .core import exits, proc
from .core.errors import TelepathyError
from .core.events import Event, of_kind
from .core.jsonl import last_per_step, read_jsonl, wait_for_step
from .core.paths import RunPaths
from .core.resources import config as shipped_config
from .core.resources import job_script
from .slurm import scontrol
from .slurm.cluster import LocalCluster

console = Console(highlight=False)


def resume_cmd(config: str, run_dir: Path, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "telepathy.resume", "--config", config, "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_local(config: str, root: Path, stop_at: int) -> tuple[Path, Path]:
    sets: list[str] = []
    reference, preempted = root / "reference", root / "preempted"
    console.print(f"[bold]1.[/] uninterrupted reference run -> {reference}")
    ref = proc.spawn(resume_cmd(config, reference, sets), root / "reference.log")
    if ref.wait() != 0:
        raise SystemExit(f"reference run failed; see {root / 'reference.log'}")
    console.print(f"[bold]2.[/] the same run, sent SIGTERM after step {stop_at} -> {preempted}")
    job = proc.spawn(resume_cmd(config, preempted, sets), root / "preempted.log")
    seen = wait_for_step(RunPaths.at(preempted).metrics, stop_at, 300, lambda: job.poll() is None)
    job.send_signal(signal.SIGTERM)
    code = job.wait()
    console.print(f"   signal sent at step {seen}; the run saved and exited with {code} "
                  "(75 = saved, please requeue)")
    console.print("[bold]3.[/] the same command again: it resumes from the newest valid checkpoint")
    job = proc.spawn(resume_cmd(config, preempted, sets), root / "preempted.log")
    if job.wait() != 0:
        raise SystemExit(f"resumed run failed; see {root / 'preempted.log'}")
    return reference, preempted


def run_slurm(config: str, root: Path, stop_at: int, gpus: int) -> tuple[Path, Path]:
    cluster = LocalCluster(Path("runs/slurm-local").absolute()).up()
    console.print(f"[bold]0.[/] local SLURM cluster up: export SLURM_CONF={cluster.conf}")
    script = str(job_script())

    def submit(name: str) -> str:
        env = {**cluster.env(), "TELEPATHY_CONFIG": str(Path(config).absolute()),
               "TELEPATHY_RUN_DIR": str((root / name).absolute()),
               "TELEPATHY_PYTHON": sys.executable}
        return scontrol.sbatch(script, [f"--gpus-per-node=h100:{gpus}", f"--job-name=demo-{name}",
                                        f"--output={root.absolute()}/%x-%j.out",
                                        f"--error={root.absolute()}/%x-%j.err"], env=env)

    def wait_end(job: str) -> tuple[str, int]:
        while True:
            state, restarts = scontrol.job_state(job, env=cluster.env())
            if state not in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING",
                             "SIGNALING"):
                return state, restarts
            time.sleep(1)

    reference, preempted = root / "reference", root / "preempted"
    job = submit("reference")
    console.print(f"[bold]1.[/] reference: sbatch --gpus-per-node=h100:{gpus} "
                  f"slurm/preemptible.slurm -> job {job}, run to the end")
    state, _ = wait_end(job)
    if state != "COMPLETED":
        raise SystemExit(f"reference job {job} ended {state}; see {root}/demo-reference-{job}.err")
    job = submit("preempted")
    console.print(f"[bold]2.[/] the same job again -> job {job}; scancel -s TERM after step {stop_at}")
    seen = wait_for_step(RunPaths.at(preempted).metrics, stop_at, 600)
    scontrol.scancel(job, signal="TERM", env=cluster.env())
    while scontrol.job_state(job, env=cluster.env())[1] < 1:
        time.sleep(0.5)
    saved = of_kind(list(read_jsonl(RunPaths.at(preempted).events)), Event.REQUEUE)
    console.print(f"   signal at step ~{seen}: saved, then requeued itself: job {job} "
                  f"Restarts=1, cause {saved[-1]['cause'] if saved else '?'}")
    state, restarts = wait_end(job)
    console.print(f"[bold]3.[/] job {job} resumed from its checkpoint and ended {state} "
                  f"after {restarts} requeue(s); its log: {root}/demo-preempted-{job}.err")
    cluster.down()
    return reference, preempted


def compare(reference: Path, resumed: Path) -> bool:
    ref = last_per_step(list(read_jsonl(RunPaths.at(reference).metrics)))
    run = last_per_step(list(read_jsonl(RunPaths.at(resumed).metrics)))
    events = list(read_jsonl(RunPaths.at(resumed).events))
    resumes = [e["step"] for e in of_kind(events, Event.RESUME)]
    first = min(resumes) + 1 if resumes else 1
    after = [s for s in sorted(ref) if s >= first]
    equal = [s for s in after if s in run and run[s]["loss"] == ref[s]["loss"]]
    table = Table(title="loss after the resume: reference vs preempted+resumed")
    for col in ("step", "reference", "resumed", "restart", "equal"):
        table.add_column(col, justify="right")
    shown = sorted(set(after[:3] + after[len(after) // 2:len(after) // 2 + 1] + after[-3:]))
    for s in shown:
        r = run.get(s, {})
        table.add_row(str(s), repr(ref[s]["loss"]), repr(r.get("loss")), str(r.get("restart")),
                      "yes" if s in equal else "[red]NO[/]")
    console.print(table)
    ok = bool(after) and len(equal) == len(after) and max(run) == max(ref)
    verdict = "[green]match bit for bit[/]" if ok else "[red]DIFFER[/]"
    console.print(f"{len(equal)}/{len(after)} steps after the resume (steps {first}-{max(ref)}) "
                  f"{verdict}; resumed at step(s) {resumes}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="telepathy demo", description=__doc__)
    p.add_argument("--config", help="default: configs/tiny-cpu.yaml (the one shipped with "
                                    "telepathy when there is none here)")
    p.add_argument("--root", default="runs/demo", help="where the demo's runs go (emptied first)")
    p.add_argument("--stop-at", type=int, default=120, help="send SIGTERM after this step")
    p.add_argument("--gpus", type=int, default=2, help="fake H100s per job on the local cluster")
    p.add_argument("--local", action="store_true", help="no SLURM: one process, SIGTERM, rerun")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.steps=60")
    args = p.parse_args(argv)
    config = args.config or ("configs/tiny-cpu.yaml" if Path("configs/tiny-cpu.yaml").is_file()
                             else str(shipped_config("tiny-cpu.yaml")))
    try:
        cfg = load_config(config, args.set)
    except TelepathyError as exc:
        console.print(f"[red]{exc}[/]")
        return exits.BAD_INPUT
    if args.stop_at >= cfg.train.steps:
        console.print(f"[red]--stop-at {args.stop_at} is not before the run's last step "
                      f"(train.steps={cfg.train.steps}): give a smaller --stop-at[/]")
        return exits.BAD_INPUT
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if args.set:  # both paths read one file: the config with the overrides in it
        config = str((root / "config.yaml").absolute())
        Path(config).write_text(yaml.safe_dump(cfg.to_dict()))
    started = time.time()
    if args.local:
        reference, resumed = run_local(config, root, args.stop_at)
    else:
        reference, resumed = run_slurm(config, root, args.stop_at, args.gpus)
    ok = compare(reference, resumed)
    console.print(f"demo took {time.time() - started:.0f} s; runs and logs under {root}")
    return exits.OK if ok else exits.FAILED


if __name__ == "__main__":
    sys.exit(main())
