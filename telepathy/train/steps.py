"""Optimizer steps on the DeepSpeed ZeRO-3 engine: the samples of a step, split over ranks and
micro-steps, forward, backward, step; and dropping a step that ran out of memory."""

from __future__ import annotations

import gc
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.examples import IGNORE
from ..data.stream import rank_slice
from ..engine import adapter
from ..engine.distributed import Dist
from ..plan.placement import Layout
from ..testing.faults import FaultPlan


def forward(model: Any, batch: dict[str, np.ndarray], device: torch.device) -> torch.Tensor:
    """The logits of a batch (input_ids, and position_ids where examples are packed)."""
    kwargs = {k: torch.from_numpy(batch[k]).to(device) for k in ("input_ids", "position_ids")
              if k in batch}
    return model(**kwargs, use_cache=False).logits


def loss_sum(model: Any, batch: dict[str, np.ndarray], device: torch.device) -> torch.Tensor:
    """The summed cross-entropy of the labels that count (IGNORE elsewhere), in float32."""
    logits = forward(model, batch, device)
    labels = torch.from_numpy(batch["labels"]).to(device)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


class EngineSteps:
    def __init__(self, engine: Any, stream: Any, dist: Dist,
                 faults: FaultPlan = FaultPlan()):
        self.engine = engine
        self.stream = stream
        self.dist = dist
        self.faults = faults
        self.last_tokens: int | None = None

    def run(self, step: int, samples_seen: int, layout: Layout) -> tuple[float, float]:
        """One optimizer step. Its loss is the mean over the tokens that count in the loss (the
        labels not ignored) of the whole global batch, whatever the micro-batch, the
        accumulation or the world size: each rank knows that count from the data alone."""
        ids = self.stream.sample_ids(samples_seen, layout.global_batch)
        lr = self.engine.get_lr()[0]
        counted = max(1, self.stream.loss_tokens(ids))
        self.last_tokens = self.stream.real_tokens(ids)
        # DeepSpeed divides each micro-step's gradient by the accumulation and averages the
        # ranks' gradients: scaled back, the sum over every micro-step of every rank is the
        # global sum of token losses over `counted`.
        scale = layout.accum * self.dist.world_size / counted
        total = torch.zeros((), dtype=torch.float32, device=self.dist.device)
        for micro_step in range(layout.accum):
            mine = rank_slice(ids, micro_step, self.dist.rank, self.dist.world_size,
                              layout.micro_batch)
            summed = loss_sum(self.engine, self.stream.inputs(mine), self.dist.device)
            if micro_step == min(1, layout.accum - 1):
                self.faults.hit("step.oom", step + 1, self.dist.rank)
            self.engine.backward(summed * scale)
            self.engine.step()
            total += summed.detach() / counted
        return self.dist.sum([total])[0], lr

    def counters(self) -> tuple[int, int]:
        return adapter.step_counters(self.engine)

    def drop_partial_step(self, counters: tuple[int, int], layout: Layout) -> None:
        adapter.drop_partial_step(self.engine, counters, layout.micro_batch, layout.global_batch,
                                  layout.accum)
        gc.collect()
        if self.dist.device.type == "cuda":
            torch.cuda.empty_cache()

    def grad_norm(self) -> float | None:
        return adapter.grad_norm(self.engine)

    def memory_peak_gb(self) -> float | None:
        if self.dist.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated() / 2**30
