"""`telepathy plan` (`python -m telepathy.plan`): the placement on 1-4 GPUs (of one node, or of
each of several), and which count finishes soonest.

    telepathy plan --config configs/llama-1b-h100.yaml            # placements only
    telepathy plan --config C --run-dir runs/llama --slurm        # + when each starts
    telepathy plan --config C --run-dir runs/llama --submit       # + submit the best
    telepathy plan --config C --slurm --nodes 2                   # 1 or 2 nodes x 1-4 GPUs

For each count (with `--nodes N`: each node count 1..N times 1-4 GPUs per node): world size,
micro-batch x accumulation (global batch fixed), offload, modelled memory per GPU, and the step
time (measured by the run where it ran at that world size, else the throughput model).
`--slurm` asks `sbatch --test-only` when each count would start and recommends the count that
finishes the remaining steps soonest; `--submit` submits that count with
slurm/preemptible.slurm. Exit status: 0 ok, 2 bad input or no count possible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from ..checkpoint.directory import complete_steps
from ..config import Config, load_config
from ..core import exits, logs, proc
from ..core.errors import TelepathyError
from ..core.fsutil import write_atomic
from ..core.jsonl import read_jsonl
from ..core.paths import RunPaths
from ..core.resources import job_script
from ..slurm import scontrol
from ..slurm.jobspec import sbatch_args
from .gpucount import Option, measured_step_times, parse_test_only, recommend, step_time
from .model import model_shape
from .placement import MAX_GPUS, PlanError, plan, request_for

log = logging.getLogger("telepathy.plan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="telepathy plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--run-dir", help="the run to continue: remaining steps, measured step times")
    p.add_argument("--gpu-mem-gib", type=float, help="memory per GPU (default placement.gpu_mem_gib)")
    p.add_argument("--slurm", action="store_true", help="ask sbatch --test-only when each starts")
    p.add_argument("--submit", action="store_true", help="submit the recommended count (needs --run-dir)")
    p.add_argument("--script", help="the batch script (default: telepathy's slurm/preemptible.slurm)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch argument, e.g. --sbatch-arg=--account=me (repeatable)")
    p.add_argument("--nodes", type=int, default=1,
                   help="weigh 1..NODES nodes of 1-4 GPUs each (default 1: one node)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p.parse_args(argv)


def wait_for(cfg: Config, gpus: int, script: str, extra: list[str], env: dict[str, str],
             nodes: int = 1) -> tuple[float | None, str | None]:
    """Seconds until SLURM would start this job on `nodes` x `gpus` GPUs (sbatch --test-only)."""
    cmd = ["sbatch", "--test-only", *sbatch_args(cfg, gpus, nodes), *extra, script]
    result = proc.run(cmd, timeout=60, env=env, check=False)
    start = parse_test_only(result.stderr + result.stdout)
    if start is None:
        return None, (result.stderr.strip() or result.stdout.strip())[-300:]
    return max(0.0, (start - datetime.now()).total_seconds()), None


def options(cfg: Config, run_dir: Path | None, gpu_mem_gib: float, max_nodes: int = 1
            ) -> list[Option]:
    """Every node count 1..max_nodes times 1-4 GPUs per node."""
    measured = measured_step_times(read_jsonl(RunPaths.at(run_dir).metrics)) if run_dir else {}
    out = []
    shape = model_shape(cfg, count=True, run_dir=run_dir)
    for nodes in range(1, max_nodes + 1):
        for gpus in range(1, MAX_GPUS + 1):
            req = request_for(cfg, nodes * gpus, gpu_mem_gib, shape)
            try:
                p = plan(req)
            except PlanError as exc:
                out.append(Option(gpus, None, str(exc), nodes=nodes))
                continue
            seconds, source = step_time(nodes * gpus, req.shape,
                                        p.global_batch * cfg.data.seq_len, measured,
                                        cfg.placement.gpu_tflops, cfg.placement.mfu,
                                        cfg.placement.scaling)
            out.append(Option(gpus, p, None, seconds, source, nodes=nodes))
    return out


def remaining_steps(cfg: Config, run_dir: Path | None) -> int:
    done = complete_steps(RunPaths.at(run_dir).checkpoints) if run_dir else []
    return max(0, cfg.train.steps - (done[-1] if done else 0))


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def table(opts: list[Option], steps: int, best: Option | None, asked: bool) -> Table:
    t = Table(title=f"placements for {steps} remaining steps")
    several = any(o.nodes > 1 for o in opts)
    for col in (("nodes",) if several else ()) + ("GPUs", "micro x accum", "offload",
                                                  "memory/GPU", "step", "run"):
        t.add_column(col, justify="right")
    if asked:
        t.add_column("starts in", justify="right")
        t.add_column("finishes in", justify="right")
    for o in opts:
        mark = " *" if o == best else ""
        first = [str(o.nodes)] if several else []
        gpus = f"{o.gpus}{mark}" if not several else f"{o.gpus}/node{mark}"
        if o.plan is None:
            t.add_row(*first, gpus, "[red]no placement[/red]", *([""] * (4 + 2 * asked)))
            continue
        row = [*first, gpus, f"{o.plan.layout.micro_batch} x {o.plan.layout.accum}",
               o.plan.offload, f"{o.plan.memory.peak_gib:.1f} GiB",
               f"{o.step_s:.3g} s ({o.step_source})", _hours(o.run_s(steps))]
        if asked:
            row += [_hours(o.wait_s) if o.error is None else "[red]cannot start[/red]",
                    _hours(o.finish_s(steps))]
        t.add_row(*row)
    return t


def as_json(opts: list[Option], steps: int, best: Option | None, job_id: str | None) -> dict:
    rows = []
    for o in opts:
        row = {"nodes": o.nodes, "gpus": o.gpus, "ranks": o.ranks, "error": o.error,
               "step_s": o.step_s, "step_source": o.step_source,
               "wait_s": o.wait_s, "run_s": o.run_s(steps), "finish_s": o.finish_s(steps)}
        if o.plan is not None:
            row.update(micro_batch=o.plan.layout.micro_batch, accum=o.plan.layout.accum,
                       global_batch=o.plan.global_batch, offload=o.plan.offload,
                       memory_gib=round(o.plan.memory.peak_gib, 3), notes=list(o.plan.notes))
        rows.append(row)
    return {"remaining_steps": steps, "options": rows,
            "recommended_gpus": best.gpus if best else None,
            "recommended_nodes": best.nodes if best else None,
            "recommended_ranks": best.ranks if best else None, "submitted_job_id": job_id}


def main(argv: list[str] | None = None) -> int:
    logs.configure(0)
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.submit and not args.run_dir:
            raise TelepathyError("--submit needs --run-dir: the job must know which run to "
                                 "start or resume")
        if args.nodes < 1:
            raise TelepathyError(f"--nodes {args.nodes}: give the most nodes to weigh, 1 or more")
        run_dir = Path(args.run_dir) if args.run_dir else None
        opts = options(cfg, run_dir, args.gpu_mem_gib or cfg.placement.gpu_mem_gib, args.nodes)
        if all(o.plan is None for o in opts):
            raise TelepathyError("no GPU count 1-4 has a placement: " + opts[0].error)
        steps = remaining_steps(cfg, run_dir)
        asked = args.slurm or args.submit
        script = args.script or str(job_script())
        env = dict(os.environ)
        # The job runs this Python (an installed telepathy needs no checkout's .venv).
        env.setdefault("TELEPATHY_PYTHON", sys.executable)
        if run_dir:
            env.update(TELEPATHY_CONFIG=str(Path(args.config).absolute()),
                       TELEPATHY_RUN_DIR=str(run_dir.absolute()))
        if args.submit:  # the job runs the config planned here, --set overrides included
            submitted = RunPaths.at(run_dir).submitted_config
            submitted.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(submitted, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
            env["TELEPATHY_CONFIG"] = str(submitted)
        if asked:
            for i, o in enumerate(opts):
                if o.plan is not None:
                    wait, why = wait_for(cfg, o.gpus, script, args.sbatch_arg, env, o.nodes)
                    opts[i] = dataclasses.replace(o, error=why, wait_s=wait)
        best = recommend(opts, steps) if asked else None
        job_id = None
        if args.submit:
            if best is None:
                raise TelepathyError("SLURM would start none of the counts: " +
                                     "; ".join(f"{o.name}: {o.error}" for o in opts if o.error))
            Path("runs/logs").mkdir(parents=True, exist_ok=True)  # the script's --output
            job_id = scontrol.sbatch(script, [*sbatch_args(cfg, best.gpus, best.nodes),
                                              *args.sbatch_arg], env=env)
    except (TelepathyError, proc.CommandError) as exc:
        log.error("%s", exc)
        return exits.BAD_INPUT
    if args.json:
        print(json.dumps(as_json(opts, steps, best, job_id), indent=1))
        return exits.OK
    console = Console()
    console.print(table(opts, steps, best, asked))
    for o in opts:
        if o.error:
            console.print(f"{o.name}: {o.error}", markup=False)
    if best is not None:
        console.print(f"recommended: {best.name}, finishing in about "
                      f"{_hours(best.finish_s(steps))}")
    if job_id:
        console.print(f"submitted job {job_id} on {best.name}")
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
