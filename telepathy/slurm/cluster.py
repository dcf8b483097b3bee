"""Start and stop the single-node SLURM cluster of slurm/local/ from Python (demo, tests,
`telepathy cluster up|down`)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core import exits, proc
from ..core.resources import local_cluster_scripts


@dataclass(frozen=True)
class LocalCluster:
    state_dir: Path
    port: int = 6817
    grace_s: int = 60

    def _env(self) -> dict[str, str]:
        return {**os.environ, "TELEPATHY_SLURM_PORT": str(self.port),
                "TELEPATHY_SLURM_GRACE_S": str(self.grace_s)}

    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    def env(self) -> dict[str, str]:
        """The environment in which SLURM commands talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def up(self) -> LocalCluster:
        proc.run(["bash", str(local_cluster_scripts() / "up.sh"), str(self.state_dir)], timeout=60,
                 env=self._env())
        return self

    def down(self) -> None:
        proc.run(["bash", str(local_cluster_scripts() / "down.sh"), str(self.state_dir)],
                 timeout=60, env=self._env())


def main(argv: list[str] | None = None) -> int:
    """`telepathy cluster up|down [STATE_DIR]`: the single-node cluster of slurm/local/."""
    import argparse

    p = argparse.ArgumentParser(prog="telepathy cluster", description=main.__doc__)
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("state_dir", nargs="?", default="runs/slurm-local",
                   help="where the cluster keeps its state (default %(default)s)")
    p.add_argument("--port", type=int, default=int(os.environ.get("TELEPATHY_SLURM_PORT", 6817)),
                   help="slurmctld's port; slurmd uses the next one")
    p.add_argument("--grace-s", type=int,
                   default=int(os.environ.get("TELEPATHY_SLURM_GRACE_S", 60)),
                   help="preemption grace time of the preemptible partition")
    args = p.parse_args(argv)
    cluster = LocalCluster(Path(args.state_dir).absolute(), args.port, args.grace_s)
    try:
        cluster.up() if args.action == "up" else cluster.down()
    except proc.CommandError as exc:
        print(f"telepathy cluster {args.action}: {exc}", file=sys.stderr)
        return exits.FAILED
    if args.action == "up":
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        print(f"stopped the local cluster under {cluster.state_dir}")
    return exits.OK
