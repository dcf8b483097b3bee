"""Where the files telepathy ships live: the job script, the local-cluster scripts, the configs.

In a source checkout they are the repository's own `slurm/` and `configs/` (what users see and
edit). An installed package (`pip install .`) carries copies made at build time under
`telepathy/_shipped/` (see setup.py), so `telepathy plan`, `telepathy cluster up` and the demo
work from any directory.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
SHIPPED = PACKAGE / "_shipped"
CHECKOUT = PACKAGE.parent


MARKERS = {"slurm": "preemptible.slurm", "configs": "tiny-cpu.yaml"}


def _root(name: str) -> Path:
    for base in (CHECKOUT, SHIPPED):
        if (base / name / MARKERS[name]).is_file():
            return base / name
    raise FileNotFoundError(f"telepathy's {name}/ is neither in the source checkout ({CHECKOUT}) "
                            f"nor in the installed package ({SHIPPED}); reinstall telepathy")


def job_script() -> Path:
    """slurm/preemptible.slurm"""
    return _root("slurm") / "preemptible.slurm"


def local_cluster_scripts() -> Path:
    """slurm/local/ (up.sh, down.sh)"""
    return _root("slurm") / "local"


def config(name: str) -> Path:
    """A shipped config by file name, e.g. 'tiny-cpu.yaml'."""
    return _root("configs") / name
