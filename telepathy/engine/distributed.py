"""The process group: starting it, and the few collectives used at step boundaries and saves."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import adapter


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dist:
    """The process group as the trainer sees it: rank, world, and the few collectives it needs."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank = rank
        self.world_size = world_size
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def any(self, flags: Sequence[bool]) -> list[bool]:
        """Element-wise OR of boolean flags across ranks (one all-reduce)."""
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def mean(self, value: torch.Tensor) -> float:
        """Mean of a scalar tensor across ranks."""
        t = value.detach().float().reshape(1).to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / self.world_size).item()

    def sum(self, values: Sequence[float | torch.Tensor]) -> list[float]:
        """Element-wise sums of scalars across ranks, in float64 (one all-reduce)."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().reshape(())
                         for v in values]).to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.tolist()]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def start(rank: int, world_size: int, local_rank: int, master_addr: str,
          master_port: int | None, cuda: bool, timeout_s: float | None = None) -> Dist:
    """Set the variables DeepSpeed reads, then start the process group (NCCL on CUDA, else
    gloo) whose collectives give up after `timeout_s`; `master_port` None picks a free port (a
    single process)."""
    os.environ.update(MASTER_ADDR=master_addr, RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(local_rank), MASTER_PORT=str(master_port or free_port()))
    adapter.init_distributed("nccl" if cuda else "gloo", timeout_s)
    if cuda:
        torch.cuda.set_device(local_rank)
        return Dist(rank, world_size, torch.device("cuda", local_rank))
    return Dist(rank, world_size, torch.device("cpu"))


def stop() -> None:
    """Leave the process group, if one was started (a rare abort at exit was seen without)."""
    if dist.is_initialized():
        dist.destroy_process_group()
