"""What the chaos harness shows: a table of the faults, the JSON, and the timeline picture
(loss against wall-clock time, each fault marked where it struck and shaded until recovery)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .harness import Result


def table(result: Result) -> Table:
    t = Table(title="chaos: faults injected and recovered")
    for col in ("#", "kind", "step", "rank", "detect", "next step", "redone", "resumable",
                "recovered"):
        t.add_column(col, justify="right" if col not in ("kind",) else "left")
    for i, f in enumerate(result.faults, 1):
        t.add_row(str(i), f.kind, str(f.step), "-" if f.rank is None else str(f.rank),
                  "-" if f.detect_s is None else f"{f.detect_s:.1f} s",
                  "-" if f.recover_s is None else f"{f.recover_s:.1f} s",
                  "-" if f.steps_redone is None else str(f.steps_redone),
                  "yes" if f.resumable else "NO", "yes" if f.recovered else f"NO {f.error or ''}")
    return t


def print_report(result: Result, console: Console) -> None:
    console.print(table(result))
    s = result.summary
    console.print(f"injected {s['injected']}/{s['requested']}, recovered {s['recovered']}, "
                  f"lost runs {s['lost_runs']}; losses: {s['bit_exact_steps']} steps bit for bit, "
                  f"{s['close_steps']} within 1e-5 (smaller micro-batch after an OOM), "
                  f"differing {s['differing_steps']}, missing {s['missing_steps']}; run directory "
                  f"resumable at every sample: {s['resumable_always']} ({s['resumable_samples']} "
                  f"samples); {'OK' if s['ok'] else 'FAILED'} in {s['wall_s']:.0f} s")


COLORS = {"rank_kill": "tab:red", "rank_hang": "tab:purple", "save_kill": "tab:brown",
          "preempt": "tab:blue", "scancel_term": "tab:cyan", "time_limit": "tab:olive",
          "bitflip": "tab:pink", "disk_full": "tab:gray", "node_fail": "black",
          "oom_one_rank": "tab:orange"}


def picture(result: Result, path: Path) -> Path:
    """Loss against wall-clock time with every fault marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 5), dpi=110)
    rows = result.timeline
    ax.scatter([r["t"] for r in rows], [r["loss"] for r in rows], s=2, c="tab:green",
               label="loss (every step of every allocation)")
    seen: set[str] = set()
    for f in result.faults:
        color = COLORS.get(f.kind, "tab:red")
        ax.axvline(f.t, color=color, lw=1, label=None if f.kind in seen else f.kind)
        if f.recover_s:
            ax.axvspan(f.t, f.t + f.recover_s, color=color, alpha=0.12)
        seen.add(f.kind)
    s = result.summary
    ax.set_xlabel("seconds since the chaos job was submitted")
    ax.set_ylabel("training loss")
    ax.set_title(f"{s['injected']} faults, {s['recovered']} recovered, {s['lost_runs']} lost runs, "
                 f"losses exact: {s['exact']} (world {s['world_size']}, seed {s['seed']}); "
                 "shaded: fault to the next step")
    ax.legend(loc="upper right", fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
