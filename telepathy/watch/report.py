"""`telepathy report RUN_DIR [--json] [--png PATH]`: a report of a whole run.

Status, steps, losses (first/last/best), evaluations (last/best, the best checkpoint), throughput,
GPU usage, every allocation with the cause of its ending, checkpoint save times; as text, as JSON,
and as a PNG figure (the training loss with the evaluations' marks, and throughput against step,
with a marker where the run was stopped and where it resumed).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ..core import exits
from ..core.jsonl import last_per_step, read_jsonl
from ..core.paths import RunPaths
from .runview import RunView
from .tail import load_view


def build(run_dir: Path) -> dict[str, Any]:
    view = load_view(run_dir)
    paths = RunPaths.at(run_dir)
    rows = sorted(last_per_step(list(read_jsonl(paths.metrics))).values(), key=lambda r: r["step"])
    system = [r for f in sorted(paths.root.glob("system-*.jsonl")) for r in read_jsonl(f)
              if r.get("gpus")]
    gpu_utils = [g["util_pct"] for s in system for g in s["gpus"]]
    saves = view.checkpoint_saves
    seconds = [s["seconds"] for s in saves if s.get("seconds") is not None]
    return {
        "run_dir": str(run_dir), "state": view.state, "step": view.step,
        "total_steps": view.total_steps, "restarts": view.restarts,
        "loss": {"first": view.loss_first, "last": view.loss,
                 "best": {"step": view.loss_best[0], "loss": view.loss_best[1]}
                 if view.loss_best else None},
        "throughput": {
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rows) if rows else None,
            "step_time_s_median": statistics.median(r["step_time_s"] for r in rows) if rows else None},
        "gpu": {"samples": len(system),
                "util_pct_mean": statistics.fmean(gpu_utils) if gpu_utils else None,
                "mem_peak_gb": max((r.get("gpu_mem_peak_gb", 0.0) for r in rows), default=None)
                if any("gpu_mem_peak_gb" in r for r in rows) else None},
        "allocations": [{"index": a.index, "job_id": a.job_id, "started_at": a.started_at,
                         "start_step": a.start_step, "end_step": a.end_step, "ended": a.ended,
                         "resumed_from": a.resumed_from} for a in view.allocations],
        "checkpoints": {"saves": len(saves), "seconds_mean": statistics.fmean(seconds) if seconds
                        else None, "seconds_max": max(seconds, default=None),
                        "bytes_last": saves[-1]["bytes"] if saves else None, "list": saves},
        "eval": evaluation(view),
        "trackers": view.trackers,
        "mirror": view.mirror,
        "warnings": view.warnings,
        "markers": view.markers,
        "series": {"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows],
                   "tokens_per_s": [r["tokens_per_s"] for r in rows]},
    }


def evaluation(view: RunView) -> dict[str, Any]:
    """The evaluations: each evaluated step's eval_loss, the newest, the best, the best
    checkpoint's step (null without a best_checkpoint event)."""
    point = lambda e: {"step": e[0], "eval_loss": e[1]} if e else None  # noqa: E731
    return {"series": {"step": [s for s, _ in view.evals], "eval_loss": [v for _, v in view.evals]},
            "last": point(view.eval_loss), "best": point(view.eval_best),
            "best_checkpoint": view.best_checkpoint}


def text(report: dict[str, Any]) -> str:
    loss, tp, ck = report["loss"], report["throughput"], report["checkpoints"]
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"run        {report['run_dir']}: {report['state']}, step {report['step']}/"
        f"{report['total_steps']}, {report['restarts']} restart(s)",
        f"loss       first {f(loss['first'], '.4f')}, last {f(loss['last'], '.4f')}, best "
        f"{f(loss['best']['loss'], '.4f') if loss['best'] else '-'}"
        f"{' at step ' + str(loss['best']['step']) if loss['best'] else ''}",
        *eval_text(report["eval"]),
        f"throughput {f(tp['tokens_per_s_median'], ',.0f')} tokens/s median, "
        f"{f(tp['step_time_s_median'], '.3f')} s/step",
        f"gpu        {report['gpu']['samples']} samples, mean utilisation "
        f"{f(report['gpu']['util_pct_mean'], '.0f')}%, peak memory "
        f"{f(report['gpu']['mem_peak_gb'], '.1f')} GB",
        f"checkpoints {ck['saves']} saved, mean {f(ck['seconds_mean'], '.2f')} s, max "
        f"{f(ck['seconds_max'], '.2f')} s, last {f(ck['bytes_last'], ',')} bytes"]
    lines += [f"{name:<10} {where}" for name, where in report.get("trackers", {}).items()]
    mirror = report.get("mirror")
    if mirror:
        up = mirror["uploaded"]
        lines.append(f"mirror     {mirror['uploads']} upload(s), newest "
                     f"{up['checkpoint'] if up else '-'}"
                     + (f"; fetched {', '.join(f['checkpoint'] for f in mirror['fetched'])}"
                        if mirror["fetched"] else "")
                     + (f"; rejected {', '.join(r['checkpoint'] for r in mirror['rejected'])}"
                        if mirror["rejected"] else ""))
    lines += [f"warning    {w}" for w in report.get("warnings", [])]
    lines.append("allocations:")
    for a in report["allocations"]:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["started_at"]))
        lines.append(f"  #{a['index']} job {a['job_id'] or '-'} {started}: steps {a['start_step']}"
                     f" -> {a['end_step']}, ended: {a['ended']}")
    return "\n".join(lines)


def eval_text(ev: dict[str, Any]) -> list[str]:
    """The report's line of evaluations; none for a run that never evaluated."""
    if not ev["last"] and ev["best_checkpoint"] is None:
        return []
    line = "eval       none yet"
    if ev["last"] and ev["best"]:
        line = (f"eval       last {ev['last']['eval_loss']:.4f} at step {ev['last']['step']}, "
                f"best {ev['best']['eval_loss']:.4f} at step {ev['best']['step']}")
    if ev["best_checkpoint"] is not None:
        line += f", best checkpoint step {ev['best_checkpoint']}"
    return [line]


def png(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure(report: dict[str, Any]) -> Any:
    """The report's figure: loss (training, and the evaluations as marks) and tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, ev = report["series"], report["eval"]["series"]
    fig, (ax_loss, ax_tp) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax_loss.plot(s["step"], s["loss"], lw=1, color="tab:blue",
                 label="train loss" if ev["step"] else None)
    if ev["step"]:
        ax_loss.plot(ev["step"], ev["eval_loss"], ls="-", lw=0.8, marker="o", ms=4,
                     color="tab:orange", label="eval loss")
    ax_loss.set_ylabel("loss")
    ax_tp.plot(s["step"], s["tokens_per_s"], lw=1, color="tab:gray")
    ax_tp.set_ylabel("tokens/s")
    ax_tp.set_xlabel("step")
    for m in report["markers"]:
        style = {"stopped": dict(color="tab:red", ls="--"), "resumed": dict(color="tab:green", ls=":")}
        for ax in (ax_loss, ax_tp):
            ax.axvline(m["step"], lw=1.2, **style[m["kind"]],
                       label=f"{m['kind']} ({m.get('cause', '')})".replace(" ()", ""))
        ax_loss.annotate("stop" if m["kind"] == "stopped" else "resume",
                         (m["step"], 1.0 if m["kind"] == "stopped" else 0.92),
                         xycoords=("data", "axes fraction"), fontsize=7, ha="left", va="top",
                         color=style[m["kind"]]["color"])
    handles, labels = ax_loss.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax_loss.legend(unique.values(), unique.keys(), loc="upper right", fontsize=8)
    fig.suptitle(f"{report['run_dir']}: {report['state']}, {report['restarts']} restart(s)")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="telepathy report", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--png", metavar="PATH", help="also write a figure to PATH")
    args = p.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `report ... | head` ends quietly
    run_dir = Path(args.run_dir)
    if not RunPaths.at(run_dir).events.exists():
        print(f"{run_dir} has no events.jsonl: not a telepathy run directory", file=sys.stderr)
        return exits.BAD_INPUT
    report = build(run_dir)
    print(json.dumps(report, indent=1) if args.json else text(report))
    if args.png:
        png(report, Path(args.png))
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
