"""`python -m telepathy.requeue`: the job script calls this after srun; it is `telepathy requeue`
(telepathy.slurm.requeue). Kept at this path so that job scripts keep working."""

import sys

from .slurm.requeue import main

if __name__ == "__main__":
    sys.exit(main())
