"""`telepathy`: one command, a subcommand per room. Each subcommand is the `main` of its module
(also reachable as `python -m telepathy <subcommand>`); modules are imported only when their
subcommand runs, so `telepathy resume` still installs its signal handlers before torch loads.
"""

from __future__ import annotations

import importlib
import sys

from . import __version__
from .core import exits

COMMANDS: dict[str, tuple[str, str]] = {
    "resume": ("telepathy.train.resume", "start a run, or resume it from its newest valid checkpoint"),
    "launch": ("telepathy.launch.cli", "start or resume a run as a submitit job (slurm, local, debug)"),
    "requeue": ("telepathy.slurm.requeue", "after srun: requeue the job (run by the job script)"),
    "plan": ("telepathy.plan.cli", "placements on 1-4 GPUs; which count finishes soonest; submit"),
    "tail": ("telepathy.watch.tail", "watch a run (or every run under a directory)"),
    "report": ("telepathy.watch.report", "a report of a whole run: text, JSON or PNG"),
    "track": ("telepathy.track.cli", "sync: send a stopped run's steps to TensorBoard, W&B, MLflow"),
    "checkpoint": ("telepathy.checkpoint.cli", "list, verify or prune a run's checkpoints"),
    "export": ("telepathy.export.cli", "a run's weights as a Hugging Face model directory"),
    "data": ("telepathy.data.cli", "prepare: text or chats through a local tokenizer; toy data"),
    "cluster": ("telepathy.slurm.cluster", "start or stop the local single-node SLURM cluster"),
    "demo": ("telepathy.demo", "show a preemption and an exact resume on the tiny default"),
    "chaos": ("telepathy.chaos.cli", "inject faults into a job on SLURM; measure every recovery"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: telepathy <command> [options]   (telepathy {__version__})", "",
             "SLURM-native DeepSpeed ZeRO-3 training that survives preemption.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`telepathy <command> --help` describes a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return exits.OK if argv else exits.BAD_INPUT
    if argv[0] == "--version":
        print(__version__)
        return exits.OK
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"telepathy: unknown command {name!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return exits.BAD_INPUT
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
