"""A telepathy job on the local SLURM cluster, submitted with slurm/preemptible.slurm."""

import time

import yaml

from telepathy import slurmctl
from telepathy.config import load_config
from tests import helpers
from tests.helpers import ROOT

SCRIPT = str(ROOT / "slurm" / "preemptible.slurm")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE")


class Job:
    def __init__(self, cluster, tmp_path, sets=(), gpus=1, sbatch_args=(), env=None, name="run",
                 run_dir=None, job_id=None):
        """Submit a job, or (with `job_id`) follow one submitted otherwise with these files."""
        self.cluster = cluster
        self.run_dir = run_dir or tmp_path / name
        self.config = tmp_path / f"{name}.yaml"
        cfg = load_config(helpers.CONFIG, [*helpers.SETS, *sets])
        self.config.write_text(yaml.safe_dump(cfg.to_dict()))
        self.env = {**cluster.env(), "TELEPATHY_CONFIG": str(self.config),
                    "TELEPATHY_RUN_DIR": str(self.run_dir), **(env or {})}
        self.out = tmp_path / f"{name}.out"
        self.err = tmp_path / f"{name}.err"
        self.id = job_id or slurmctl.sbatch(
            SCRIPT, [f"--gpus-per-node=h100:{gpus}", f"--output={self.out}", f"--error={self.err}",
                     *sbatch_args], env=self.env, cwd=str(ROOT))

    def state(self):
        return slurmctl.job_state(self.id, env=self.cluster.env())

    def wait_step(self, step, timeout=240):
        from telepathy.jsonl import wait_for_step
        return wait_for_step(self.run_dir / "metrics.jsonl", step, timeout)

    def wait_restarts(self, restarts, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state, count = self.state()
            if count >= restarts:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {self.id} did not reach {restarts} restarts: {self.state()}")

    def wait_end(self, timeout=420):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state, restarts = self.state()
            if state in ENDED:
                return state, restarts
            time.sleep(1)
        raise TimeoutError(f"job {self.id} still {self.state()} after {timeout} s\n{self.logs()}")

    def term(self):
        slurmctl.scancel(self.id, signal="TERM", env=self.cluster.env())

    def logs(self):
        return (self.out.read_text(errors="replace") if self.out.exists() else "") + \
               (self.err.read_text(errors="replace") if self.err.exists() else "")
