"""`python -u -m telepathy.launch.node FOLDER`: what every rank of a submitit-launched job runs
(the executors' command, in place of `submitit.core._submit`).

Flag-only handlers first, for the default preemption signals and submitit's own (SIGUSR2),
before submitit, the pickled callable or torch is imported: a signal during start-up is kept
for the first step boundary. Then submitit's own job processing (its pickle, result files and
logs) runs with its signal handlers switched off; `Training` finds the flag here.
"""

from __future__ import annotations

import importlib
import os
import sys

from ..config.schema import PreemptionConfig
from ..train.signals import PreemptionFlag

flag: PreemptionFlag | None = None
"""The handlers this process installed first; None when the callable runs elsewhere (debug)."""


def signals() -> list[str]:
    """The default preemption signals and submitit's (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    own = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return list(dict.fromkeys([*PreemptionConfig().signals, own]))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    installed = PreemptionFlag(signals()).__enter__()
    # Run as `python -m`, this file is __main__; the callable imports telepathy.launch.node, a
    # second module object: the flag must be found there.
    importlib.import_module("telepathy.launch.node").flag = installed
    if len(argv) != 1:
        sys.exit("usage: python -m telepathy.launch.node SUBMITIT_FOLDER")
    from . import adapter

    adapter.keep_telepathy_handlers()
    adapter.process_job(argv[0])


if __name__ == "__main__":
    main()
