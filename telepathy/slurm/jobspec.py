"""What a training job asks SLURM for, from the config: the one source of these numbers for
`telepathy plan --submit` (sbatch options over slurm/preemptible.slurm) and telepathy.launch
(submitit's parameters). Pure.

slurm/preemptible.slurm carries the same defaults in its #SBATCH lines (tests compare them with
the production config) and the shell lines of `RANK_ENV` verbatim (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import Config

RANK_ENV = """\
ranks=${SLURM_GPUS_ON_NODE:-1}
cpus=$(( ${SLURM_CPUS_ON_NODE:-$ranks} / ranks ))
[ "$cpus" -ge 1 ] || cpus=1
# Threads per rank: its CPU share, but never more than the cores this job can really use.
threads=$(( $(nproc) / ranks ))
[ "$threads" -ge 1 ] || threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads < cpus ? threads : cpus ))}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# A port free on this (the first) node now: a port derived from the job id can be taken.
export MASTER_PORT=${MASTER_PORT:-$("$TELEPATHY_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

echo "telepathy: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST" \\
     "with $ranks rank(s), $OMP_NUM_THREADS thread(s) each; config $CONFIG, run dir $RUN_DIR; $(date -Is)"
"""
"""The batch shell's lines before srun (needs CONFIG, RUN_DIR and TELEPATHY_PYTHON): threads
per rank and the rendezvous address, and the line that opens each allocation's log."""

AFTER_SRUN = """\
status=$?
echo "telepathy: training step exited with $status; $(date -Is)"
"""
"""The batch shell's lines right after srun; the requeue step follows them."""


@dataclass(frozen=True)
class JobSpec:
    """`nodes` nodes, one rank per GPU on each, sized from the config's `slurm` section."""

    gpus: int
    gpu_type: str
    partition: str
    time_min: int
    cpus_per_gpu: int
    mem_per_gpu_gb: int
    signal: str
    """The grace signal's name without SIG (the first of preemption.signals)."""
    signal_lead_s: int
    nodes: int = 1

    @classmethod
    def of(cls, cfg: Config, gpus: int, nodes: int = 1) -> JobSpec:
        s = cfg.slurm
        return cls(gpus, s.gpu_type, s.partition, s.time_limit_min, s.cpus_per_gpu,
                   s.mem_per_gpu_gb, cfg.preemption.signals[0].removeprefix("SIG"),
                   s.signal_lead_s, nodes)

    @property
    def gres(self) -> str:
        return f"{self.gpu_type}:{self.gpus}"

    @property
    def grace_signal(self) -> str:
        return f"{self.signal}@{self.signal_lead_s}"

    def sbatch_args(self) -> list[str]:
        return [f"--nodes={self.nodes}", f"--gpus-per-node={self.gres}",
                f"--partition={self.partition}",
                f"--time={self.time_min}", f"--cpus-per-gpu={self.cpus_per_gpu}",
                f"--mem-per-gpu={self.mem_per_gpu_gb}G", f"--signal={self.grace_signal}"]


def sbatch_args(cfg: Config, gpus: int, nodes: int = 1) -> list[str]:
    """Options that size the job script for `nodes` x `gpus` GPUs from the config."""
    return JobSpec.of(cfg, gpus, nodes).sbatch_args()
