"""telepathy: preemption-proof DeepSpeed ZeRO-3 training on SLURM."""

__version__ = "0.1.0"
