"""Launch from Python with submitit, under telepathy's preemption protocol.

    import telepathy.launch
    job = telepathy.launch.submit("configs/tiny-cpu.yaml", "runs/mine", gpus=2)
    summary = job.results()[0]   # after any number of preemptions and requeues

submitit's executors, pickling, job folders and `job.results()`, with its signal handling and
requeue replaced by telepathy's on every rank: flag-only handlers installed before anything
else, the ranks agree at a step boundary and save together, and the job requeues itself (the
one policy of telepathy.slurm.policy) only after every rank's save is durable.

- api: `submit()`: check the inputs, size the job from the config, submit through submitit.
- job: `Training`, the pickled callable every rank runs; its summary when the run finished.
- node: `python -m telepathy.launch.node FOLDER`, each rank's entry point (instead of
  submitit's): handlers first, then submitit's own job processing.
- teardown: run by the batch shell after srun: end the allocation, requeue or say why not.
- adapter: every reach into submitit's internals (executors' commands, the job-state watcher,
  result files, its signal handlers).
- cli: `telepathy launch` (`python -m telepathy.launch`).

May import: train, plan, watch, data, slurm, checkpoint, config, core; submitit (here alone).
This package's own import is light (no submitit, no torch): `node` must install its handlers first.
"""

from __future__ import annotations

from typing import Any


def submit(*args: Any, **kwargs: Any) -> Any:
    """telepathy.launch.api.submit (imported on first use)."""
    from .api import submit as _submit

    return _submit(*args, **kwargs)
