"""Placement on 1-4 GPUs a node (one node or several): the ZeRO-3 memory model (`memory`,
pure), the planner that keeps the global batch fixed (`placement`, pure), choosing the GPU count
that finishes soonest (`gpucount`, pure), and `telepathy plan` (`cli`), which asks SLURM when
each count would start.

May import: slurm (sbatch, the job spec), checkpoint (remaining steps), config, core.
"""
