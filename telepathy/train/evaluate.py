"""Validation: the loss of a held-out set (eval.path), on every rank on its share, with no
gradient, at a step boundary.

The rows of the set (packed as training packs, in file order, the first eval.max_examples
examples) are dealt to the ranks in turn and run in micro-batches; every rank runs the same
number of forwards (ZeRO-3 gathers each layer's parameters collectively), a rank out of rows
running its first row again and counting nothing. The result is the summed loss over the summed
count of the tokens that count, over every rank: the same at any world size and micro-batch up
to float rounding, and bit for bit the same after an exact resume. Dropout is off (the model in
eval mode), and nothing draws from the random generators, so an evaluation leaves the training
trajectory as it was.

Before each forward the ranks agree (one all-reduce) on whether a preemption signal came: if so
the evaluation stops unfinished (nothing is written) and the trainer saves at this boundary and
leaves; the evaluation is done again after the resume.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..testing.faults import FaultPlan
from .protocols import Flag
from .steps import Objective


@dataclass(frozen=True)
class EvalResult:
    step: int
    loss: float
    tokens: int
    rows: int
    seconds: float

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl columns of an evaluation (no `loss`: not a training row)."""
        return {"step": self.step, "eval_loss": self.loss, "eval_tokens": self.tokens,
                "eval_rows": self.rows, "eval_s": round(self.seconds, 3)}


def batches_of(rows: int, rank: int, world: int, micro: int) -> list[np.ndarray]:
    """The row ids rank `rank` evaluates, in micro-batches; as many batches on every rank (an
    empty one where a rank has no rows left)."""
    mine = np.arange(rank, rows, world, dtype=np.int64)
    count = -(-rows // (world * micro))
    return [mine[i * micro:(i + 1) * micro] for i in range(count)]


class Evaluator:
    def __init__(self, stream: Any, dist: Any, micro_batch: int, faults: FaultPlan = FaultPlan(),
                 objective: Objective = Objective()):
        self.stream = stream
        self.objective = objective
        self.dist = dist
        self.micro_batch = micro_batch
        self.faults = faults

    @property
    def rows(self) -> int:
        return self.stream.rows_per_epoch

    def run(self, model: Any, step: int, flag: Flag,
            progress: Callable[[], None] = lambda: None) -> EvalResult | None:
        """Collective: the evaluation after optimizer step `step`; None when a preemption
        signal stopped it."""
        started = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64)
        counted = 0
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            for batch in batches_of(self.rows, self.dist.rank, self.dist.world_size,
                                    self.micro_batch):
                self.faults.hit("eval.batch", step, self.dist.rank)
                stop, = self.dist.any([flag.is_set])
                if stop:
                    return None
                ids = batch if batch.size else np.zeros(1, dtype=np.int64)
                with torch.no_grad():
                    summed = self.objective(model, self.stream.inputs(ids), self.dist.device)
                progress()
                if batch.size and self.objective.mean:  # a mean over its rows: weighed by them
                    total += summed.double().cpu() * batch.size
                    counted += batch.size
                elif batch.size:
                    total += summed.double().cpu()
                    counted += self.stream.loss_tokens(batch)
        finally:
            for module, training in modes:  # as it was: a user's frozen part may stay in eval
                module.training = training
        loss, tokens = self.dist.sum([total, counted])
        return EvalResult(step, loss / max(tokens, 1), int(tokens), self.rows,
                          time.perf_counter() - started)
