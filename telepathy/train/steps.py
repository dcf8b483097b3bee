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


def tensors(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's arrays as tensors on `device` (anything else as it is)."""
    return {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v).to(device)
            if isinstance(v, (np.ndarray, torch.Tensor)) else v for k, v in batch.items()}


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


class Objective:
    """What a micro-batch's forward gives: the built-in objective of a causal LM (`mean` off),
    the summed cross-entropy of the tokens that count; `model.module`'s (`mean` on), the loss
    its forward returns, a mean over its micro-batch."""

    mean = False

    def __call__(self, model: Any, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        return loss_sum(model, batch, device)


def causal_labels(labels: np.ndarray) -> np.ndarray:
    """telepathy's labels (position t: the token after t, IGNORE where nothing counts) as a
    Hugging Face causal LM takes them (position t: the token at t; the model shifts): what is
    lost is the last position's target."""
    out = np.full_like(labels, IGNORE)
    out[:, 1:] = labels[:, :-1]
    return out


class ModuleObjective(Objective):
    """`model.module`: forward(**batch), the loss (a tensor, or `.loss`) in float32. Fed from a
    token file or a file of examples (`causal`), the batch is what a causal LM receives:
    input_ids, labels in Hugging Face's convention, position_ids where examples are packed."""

    mean = True

    def __init__(self, ref: str, causal: bool):
        self.ref = ref
        self.causal = causal

    def __call__(self, model: Any, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        from ..engine.usercode import loss_of

        if self.causal:
            batch = {**batch, "labels": causal_labels(batch["labels"])}
        return loss_of(model(**tensors(batch, device)), self.ref).float()


def objective_of(cfg: Any, stream: Any) -> Objective:
    from ..data.userdata import DatasetStream

    if cfg.model.module is None:
        return Objective()
    return ModuleObjective(cfg.model.module, causal=not isinstance(stream, DatasetStream))


class EngineSteps:
    def __init__(self, engine: Any, stream: Any, dist: Dist,
                 faults: FaultPlan = FaultPlan(), objective: Objective = Objective()):
        self.engine = engine
        self.stream = stream
        self.dist = dist
        self.faults = faults
        self.objective = objective
        self.last_tokens: int | None = None

    def run(self, step: int, samples_seen: int, layout: Layout) -> tuple[float, float]:
        """One optimizer step. Its loss is the mean over the tokens that count in the loss (the
        labels not ignored) of the whole global batch, whatever the micro-batch, the
        accumulation or the world size: each rank knows that count from the data alone."""
        ids = self.stream.sample_ids(samples_seen, layout.global_batch)
        lr = self.engine.get_lr()[0]
        self.last_tokens = self.stream.real_tokens(ids)
        parts = layout.accum * self.dist.world_size
        if self.objective.mean:  # each micro-batch's mean weighs the same, as DeepSpeed's
            scale, counted = 1.0, parts
        else:
            # DeepSpeed divides each micro-step's gradient by the accumulation and averages the
            # ranks' gradients: scaled back, the sum over every micro-step of every rank is the
            # global sum of token losses over `counted`.
            counted = max(1, self.stream.loss_tokens(ids))
            scale = parts / counted
        total = torch.zeros((), dtype=torch.float32, device=self.dist.device)
        for micro_step in range(layout.accum):
            mine = rank_slice(ids, micro_step, self.dist.rank, self.dist.world_size,
                              layout.micro_batch)
            summed = self.objective(self.engine, self.stream.inputs(mine), self.dist.device)
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
