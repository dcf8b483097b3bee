"""Exit codes of telepathy's programs, defined once. Job scripts and the requeue policy read them.

| code | `telepathy resume` | `telepathy checkpoint verify` |
|---|---|---|
| 0 | the run reached train.steps | the newest checkpoint is valid |
| 1 | anything else (a crash) | the newest checkpoint is not valid |
| 2 | bad input: config, data, placement, a refused resume | bad input, or no checkpoint |
| 75 | saved after a signal: requeue, run the same command | - |
| 76 | out of memory on one rank of several: a smaller micro-batch carried; requeue | - |
| 79 | another node of the job stopped beating for `train.node_timeout_s`; requeue | - |
| 124 | hung: no step, no save progress for `train.hang_timeout_s`; requeue | - |
"""

FINISHED = 0
OK = 0
FAILED = 1
"""A crash (resume), or a check that did not pass (checkpoint verify)."""
BAD_INPUT = 2
"""Bad config, data, placement or a refused resume: requeueing would fail the same way."""
PREEMPTED = 75
"""EX_TEMPFAIL: the state is saved; requeue and run the same command (preemption.exit_code)."""
OUT_OF_MEMORY = 76
"""A rank ran out of memory while other ranks waited in collectives: it wrote the smaller
micro-batch for the next allocation (RunPaths.plan_carry) and left; requeue."""
NODE_LOST = 79
"""Another node of the job wrote no heartbeat for train.node_timeout_s (it vanished: power, a
kernel panic, a cut link); this rank left rather than wait in a collective; requeue."""
HUNG = 124
"""The watchdog saw no step complete and no save progress for train.hang_timeout_s (as
timeout(1) exits 124): every thread's stack is in the rank's log; requeue."""
