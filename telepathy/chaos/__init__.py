"""`telepathy chaos` (`python -m telepathy.chaos`): the fault harness.

Runs a job once uninterrupted on SLURM (the project's local cluster, or the one `SLURM_CONF`
names), then the same job again while injecting faults at seeded random moments: a rank killed
or stopped, a kill during a save, a preemption, `scancel -s TERM`, a time limit, a flipped byte
of the newest checkpoint, a full disk, a node failure, one rank out of memory. It measures each
recovery and compares every loss with the reference.

- `faults`: the fault kinds: how each is injected and how its detection shows;
- `harness`: the job, the reference, the loop of faults and what it measures;
- `report`: the table, the JSON and the timeline picture; `cli`: the command.

May import: slurm, checkpoint, config, core, psutil, rich, matplotlib.
"""
