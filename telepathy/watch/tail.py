"""`telepathy tail RUN_DIR`: watch a run from a login node.

    telepathy tail runs/llama            # live view in a terminal (q or Ctrl-C quits)
    telepathy tail runs/llama --follow   # keep going across requeues until it finishes
    telepathy tail runs/llama --once     # one plain snapshot (scripts, pipes, CI)
    telepathy tail runs/                 # every run under a directory, one line each

Reads only the run directory (shared filesystem) and, when reachable, asks SLURM for the job's
state. Without a terminal it prints plain text, never escape codes.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..core import exits
from ..core.events import Event, of_kind
from ..core.jsonl import read_jsonl
from ..core.paths import RunPaths
from ..core.proc import CommandError
from ..slurm import scontrol
from .runview import RunView, sparkline, summarize

LOG_LINES = 8


def load_view(run_dir: Path, now: float | None = None) -> RunView:
    paths = RunPaths.at(run_dir)
    try:
        config = yaml.safe_load(paths.config.read_text())
    except (OSError, yaml.YAMLError):
        config = None
    system = [r for f in sorted(paths.root.glob("system-*.jsonl")) for r in read_jsonl(f)]
    system.sort(key=lambda r: r.get("time", 0))
    return summarize(config, list(read_jsonl(paths.metrics)), list(read_jsonl(paths.events)),
                     system, time.time() if now is None else now)


def log_tail(run_dir: Path, lines: int = LOG_LINES) -> tuple[str | None, list[str]]:
    """The last lines of the newest allocation's job log (stderr, where telepathy logs)."""
    launches = of_kind(list(read_jsonl(RunPaths.at(run_dir).events)), Event.LAUNCH)
    path = next((e.get("stderr") or e.get("stdout") for e in reversed(launches)
                 if e.get("stderr") or e.get("stdout")), None)
    if not path or not Path(path).is_file():
        return path, []
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 64 * 1024))
        text = f.read().decode(errors="replace")
    keep = [line for line in text.splitlines() if line.strip() and not line.startswith("[rank")]
    return path, keep[-lines:]


def job_state(job_id: str | None) -> str | None:
    if not job_id:
        return None
    try:
        job = scontrol.show_job(job_id, timeout_s=5)
    except CommandError:
        return None
    return f"{job.get('JobState', '?')} (restarts {job.get('Restarts', '?')}, " \
           f"{job.get('NodeList', '?')}, partition {job.get('Partition', '?')})"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def eval_line(view: RunView) -> str:
    """The newest evaluation, the best one and the best checkpoint's step."""
    line = "none yet"
    if view.eval_loss and view.eval_best:
        (step, loss), (best_step, best) = view.eval_loss, view.eval_best
        line = f"{loss:.4f} at step {step} (best {best:.4f} at step {best_step})"
    if view.best_checkpoint is not None:
        line += f", best checkpoint step {view.best_checkpoint}"
    return line


def render(run_dir: Path, view: RunView, now: float, job: str | None,
           log: tuple[str | None, list[str]]) -> Group:
    total = view.total_steps or max(view.step, 1)
    pct = 100.0 * view.step / total
    head = Text.assemble((f"{run_dir}", "bold"), "  ", (view.state.upper(), {
        "running": "green", "finished": "bold green", "failed": "bold red", "stopped": "bold red",
        "stale": "yellow", "requeued": "cyan"}.get(view.state, "")))
    progress = Table.grid(padding=(0, 1))
    progress.add_row(ProgressBar(total=total, completed=view.step, width=40),
                     f"step {view.step}/{total} ({pct:.1f}%)",
                     f"ETA {_age(view.eta_s)}" if view.eta_s is not None else "")
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("loss", f"{_fmt(view.loss, '.4f')}  {sparkline(view.loss_trend)}  "
                          f"(first {_fmt(view.loss_first, '.4f')}, best "
                          f"{_fmt(view.loss_best[1] if view.loss_best else None, '.4f')})")
    if view.eval_loss or view.best_checkpoint is not None:
        facts.add_row("eval", eval_line(view))
    facts.add_row("lr", _fmt(view.lr, ".3e"))
    facts.add_row("throughput", f"{_fmt(view.tokens_per_s, ',.0f')} tokens/s, "
                                f"{_fmt(view.step_time_s, '.3f')} s/step")
    causes = ", ".join(f"#{a.index}: {a.ended} at step {a.end_step}"
                       for a in view.allocations[:-1]) or "none"
    facts.add_row("restarts", f"{view.restarts} ({causes})")
    if view.last_checkpoint:
        step, saved = view.last_checkpoint
        facts.add_row("checkpoint", f"step {step}, {_age(now - saved)} ago")
    else:
        facts.add_row("checkpoint", "none yet")
    if view.mirror is not None:
        up = view.mirror["uploaded"]
        facts.add_row("mirror", (f"step {up['step']} uploaded {_age(now - up['time'])} ago"
                                 if up else "nothing uploaded yet")
                      + (", FAILING" if view.mirror["failing"] else ""))
    facts.add_row("job", f"{view.job_id or '-'}" + (f": {job}" if job else ""))
    if view.system:
        s = view.system
        gpus = "; ".join(f"GPU{g['index']} {g['util_pct']:.0f}% {g['mem_used_gb']:.1f}/"
                         f"{g['mem_total_gb']:.0f} GB {g['temp_c']:.0f}C {g['power_w']:.0f} W"
                         for g in s.get("gpus", [])) or "no GPU figures"
        facts.add_row("system", f"{gpus}; CPU {s['cpu_pct']:.0f}%, RAM {s['ram_used_gb']:.1f}/"
                                f"{s['ram_total_gb']:.0f} GB, disk free {s['disk_free_gb']:.1f} GB, "
                                f"RSS {s['rss_gb']:.1f} GB ({_age(now - s['time'])} ago)")
    for name, where in view.trackers.items():
        facts.add_row(name, where)
    if view.last_update:
        facts.add_row("updated", f"{_age(now - view.last_update)} ago")
    for w in view.warnings:
        facts.add_row("warning", Text(w, style="yellow"))
    path, lines = log
    parts: list[Any] = [head, progress, facts]
    if path:
        parts.append(Panel(Text("\n".join(lines) or "(empty)", overflow="fold"),
                           title=f"log: {path}", title_align="left"))
    return Group(*parts)


def render_runs(root: Path, now: float) -> Table:
    table = Table(title=f"runs under {root}")
    for col in ("run", "state", "step", "loss", "restarts", "checkpoint", "updated"):
        table.add_column(col)
    for run_dir in sorted(p for p in root.iterdir() if RunPaths.at(p).events.exists()):
        v = load_view(run_dir, now)
        ckpt = f"{v.last_checkpoint[0]} ({_age(now - v.last_checkpoint[1])} ago)" \
            if v.last_checkpoint else "-"
        table.add_row(run_dir.name, v.state, f"{v.step}/{v.total_steps or '?'}",
                      _fmt(v.loss, ".4f"), str(v.restarts), ckpt,
                      f"{_age(now - v.last_update)} ago" if v.last_update else "-")
    return table


def snapshot(target: Path, now: float | None = None, with_slurm: bool = True) -> Any:
    now = time.time() if now is None else now
    if not RunPaths.at(target).events.exists() and target.is_dir():
        return render_runs(target, now)
    view = load_view(target, now)
    job = job_state(view.job_id) if with_slurm else None
    return render(target, view, now, job, log_tail(target))


@contextmanager
def _keys() -> Iterator[Any]:
    """Read single keys from a terminal without echo; restore it however we leave."""
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield lambda timeout: sys.stdin.read(1) if select.select([sys.stdin], [], [], timeout)[0] else None
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def run_ended(target: Path) -> bool:
    return RunPaths.at(target).events.exists() and \
        load_view(target).state in ("finished", "failed", "stopped")


def follow(target: Path, done: Callable[[], bool], interval_s: float = 2.0,
           with_slurm: bool = True) -> None:
    """Watch until `done()` (the run ended, or a launcher's job did) or `q`: redrawn in the
    terminal's alternate screen, leaving the last snapshot on the normal one; without a
    terminal, a plain snapshot every `interval_s`."""
    if sys.stdout.isatty() and sys.stdin.isatty():
        console = Console(highlight=False)
        try:
            with _keys() as key, Live(snapshot(target, with_slurm=with_slurm), console=console,
                                      auto_refresh=False, screen=True) as view:
                while not done() and key(interval_s) not in ("q", "Q"):
                    view.update(snapshot(target, with_slurm=with_slurm), refresh=True)
        except KeyboardInterrupt:
            pass
        console.print(snapshot(target, with_slurm=with_slurm))
        return
    console = Console(force_terminal=False, no_color=True, width=120, highlight=False)
    while True:
        ended = done()  # asked first: the last snapshot then shows the end
        if target.exists():  # a launcher's run directory appears when its job starts
            console.print(snapshot(target, with_slurm=with_slurm))
        if ended:
            return
        time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="telepathy tail", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="a run directory, or a directory of runs")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--follow", action="store_true",
                      help="keep watching across requeues until the run finishes")
    mode.add_argument("--once", action="store_true", help="print one plain snapshot and exit")
    p.add_argument("--interval", type=float, default=2.0, help="refresh every this many seconds")
    p.add_argument("--no-slurm", action="store_true", help="do not ask SLURM for the job state")
    args = p.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `tail ... | head` ends quietly
    target = Path(args.target)
    if not target.is_dir():
        print(f"{target} is not a directory; pass a run directory (e.g. runs/llama) or runs/",
              file=sys.stderr)
        return exits.BAD_INPUT
    interactive = sys.stdout.isatty() and sys.stdin.isatty()
    if args.once or not (interactive or args.follow):
        Console(force_terminal=False, no_color=True, width=120, highlight=False).print(
            snapshot(target, with_slurm=not args.no_slurm))
        return exits.OK
    follow(target, (lambda: run_ended(target)) if args.follow else (lambda: False), args.interval,
           with_slurm=not args.no_slurm)
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
