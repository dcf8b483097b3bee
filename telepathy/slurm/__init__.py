"""SLURM: the launch environment as a frozen view (`env`, pure), why an allocation ended and
whether to requeue it (`policy`, pure), what a job asks for (`jobspec`, pure), the scontrol,
sbatch and scancel calls (`scontrol`), the requeue step the job script runs after srun
(`requeue`), and the project's single-node cluster (`cluster`).

May import: checkpoint (the newest complete checkpoint), config, core.
"""
