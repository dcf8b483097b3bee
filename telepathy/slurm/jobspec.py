"""What a training job asks SLURM for, from the config: the one source of these numbers for
`telepathy plan --submit` (and the launchers). Pure.

slurm/preemptible.slurm carries the same defaults in its #SBATCH lines (tests compare them with
the production config); these options override them at submit time.
"""

from __future__ import annotations

from ..config.schema import Config


def sbatch_args(cfg: Config, gpus: int) -> list[str]:
    """Options that size the job script for `gpus` GPUs from the config."""
    s = cfg.slurm
    signal = cfg.preemption.signals[0].removeprefix("SIG")
    return [f"--gpus-per-node={s.gpu_type}:{gpus}", f"--partition={s.partition}",
            f"--time={s.time_limit_min}", f"--cpus-per-gpu={s.cpus_per_gpu}",
            f"--mem-per-gpu={s.mem_per_gpu_gb}G", f"--signal={signal}@{s.signal_lead_s}"]
