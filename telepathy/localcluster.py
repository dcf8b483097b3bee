"""Start and stop the single-node SLURM cluster of slurm/local/ from Python (demo and tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import proc

SCRIPTS = Path(__file__).resolve().parents[1] / "slurm" / "local"


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

    def up(self) -> "LocalCluster":
        proc.run(["bash", str(SCRIPTS / "up.sh"), str(self.state_dir)], timeout=60, env=self._env())
        return self

    def down(self) -> None:
        proc.run(["bash", str(SCRIPTS / "down.sh"), str(self.state_dir)], timeout=60, env=self._env())
