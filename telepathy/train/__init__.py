"""Training: `telepathy resume` (`resume`), the set-up phases of a training process (`phases`),
the loop (`trainer`) with its pure save decision (`saving`) and its collaborators' Protocols
(`protocols`), optimizer steps on the engine (`steps`), the resumable token stream (`data`), and
the flag-only preemption handlers (`signals`).

May import: every room below it: plan, watch, slurm, checkpoint, testing, engine, config, core.
"""
