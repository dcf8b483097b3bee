"""Watching runs: the in-job sampler of GPU and host figures (`monitor`) with its warnings
(`health`, pure), what a run directory says about its run (`runview`, pure), and the login-node
views `telepathy tail` (`tail`) and `telepathy report` (`report`).

May import: slurm (the job's state), core, psutil, pynvml, rich, matplotlib.
"""
