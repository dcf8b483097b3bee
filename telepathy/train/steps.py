"""Optimizer steps on the DeepSpeed ZeRO-3 engine: the samples of a step, split over ranks and
micro-steps, forward, backward, step; and dropping a step that ran out of memory."""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.nn.functional as F

from ..data.stream import TokenStream, rank_slice
from ..engine import adapter
from ..engine.distributed import Dist
from ..plan.placement import Layout
from ..testing.faults import FaultPlan


class EngineSteps:
    def __init__(self, engine: Any, stream: TokenStream, dist: Dist,
                 faults: FaultPlan = FaultPlan()):
        self.engine = engine
        self.stream = stream
        self.dist = dist
        self.faults = faults

    def run(self, step: int, samples_seen: int, layout: Layout) -> tuple[float, float]:
        ids = self.stream.sample_ids(samples_seen, layout.global_batch)
        lr = self.engine.get_lr()[0]
        total = torch.zeros((), dtype=torch.float32, device=self.dist.device)
        for micro_step in range(layout.accum):
            mine = rank_slice(ids, micro_step, self.dist.rank, self.dist.world_size,
                              layout.micro_batch)
            batch = torch.from_numpy(self.stream.batch(mine)).to(self.dist.device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logits = self.engine(input_ids=inputs).logits
            if micro_step == min(1, layout.accum - 1):
                self.faults.hit("step.oom", step + 1, self.dist.rank)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        return self.dist.mean(total / layout.accum), lr

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
