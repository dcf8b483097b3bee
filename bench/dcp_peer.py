"""PyTorch Distributed Checkpoint (DCP) on a ZeRO-3 rank's state: the peer of `--peer dcp`.

What DCP saves is what a ZeRO-3 rank owns, as DCP would see it: each parameter group's flat fp32
partition and its two AdamW moments, as DTensor shards (`Shard(0)` of one 1-D tensor over a CPU
device mesh, the way FSDP2 hands its shards to DCP), plus each group's step and hyperparameters
and the LR schedule. These are the same bytes telepathy (DeepSpeed's file layout) writes for a
rank, without DeepSpeed's per-parameter save walk: the figure is DCP's own cost of writing, and
of loading back into, the tensors the engine trains. The DTensors wrap the engine's own tensors
(no copy), so `dcp.load` writes into the live optimizer.

DCP is configured as torchtitan configures it (`components/checkpointer/dcp.py`): a synchronous
`dcp.save` with the default `FileSystemWriter` (one file per rank, `thread_count=1`,
`sync_files=True`: fsync, as telepathy), and `dcp.async_save` on a separate gloo process group
with the thread executor and one `DefaultStager` kept for the run (torchtitan's
`async_with_pinned_mem` stager; its staging buffers are cached and reused from the second save
on, as telepathy's snapshot buffers are, and as DCP's asynchronous-save recipe recommends with
`cache_staged_state_dict=True`). On CPU there is no pinned memory: `FileSystemWriter`'s own
cached staging pins unconditionally and fails without an accelerator, and the stager's pinned,
non-blocking and background-staging options need one, so staging is a synchronous copy into
plain cached host memory, and the stall is `async_save`'s call (staging, then the upload handed
to a thread). With CUDA the stager pins (the process executor of torchtitan's pinned mode is
left out: it needs a second process group per rank).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def rank_state(engine: Any, mesh: Any) -> dict[str, Any]:
    """The rank's ZeRO-3 state as DCP would save it: flat fp32 partitions and AdamW moments as
    DTensor shards of one global flat tensor per group, the rest as plain values."""
    from torch.distributed.tensor import DTensor, Shard

    zero = engine.optimizer  # DeepSpeedZeroOptimizer_Stage3: the flat partitions it owns
    inner = zero.optimizer   # the client AdamW, keyed by those flat partitions

    def shard(t):
        return DTensor.from_local(t, mesh, [Shard(0)], run_check=False)

    model, optim = {}, {}
    for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
        model[f"group{i}"] = shard(flat.data)
        state = inner.state[flat]
        optim[f"group{i}"] = {"exp_avg": shard(state["exp_avg"]),
                              "exp_avg_sq": shard(state["exp_avg_sq"]),
                              "step": state["step"]}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    return {"model": model, "optimizer": {"state": optim, "param_groups": groups},
            "lr_scheduler": engine.lr_scheduler.state_dict()}


def tree_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


class DcpPeer:
    """DCP's synchronous save, asynchronous save (stall and total) and load, on one state."""

    def __init__(self, engine: Any, root: Path, world_size: int) -> None:
        import torch
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.device_mesh import init_device_mesh

        self.dcp = dcp
        self.root = root
        self.state = rank_state(engine, init_device_mesh("cpu", (world_size,)))
        self.async_pg = dist.new_group(backend="gloo")  # torchtitan: async saves on their own group
        self.stager = DefaultStager(StagingOptions(
            use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
            use_async_staging=False, use_non_blocking_copy=False))
        self.bytes = 0  # of one checkpoint, all ranks' files and `.metadata` (set by the caller)
        self.describe = {
            "state": "per rank: each group's flat fp32 partition and AdamW exp_avg/exp_avg_sq as "
                     "DTensor Shard(0), steps, hyperparameters, LR schedule",
            "save": "dcp.save, FileSystemWriter(sync_files=True, thread_count=1)",
            "async_save": "dcp.async_save on a separate gloo group, thread executor, "
                          "FileSystemWriter(sync_files=True, thread_count=1), one DefaultStager "
                          "(cached staging buffers) reused",
            "pinned_memory": torch.cuda.is_available(),
            "load": "dcp.load into the same tensors, cold page cache, no checksum"}

    def save(self, tag: str) -> Path:
        """dcp.save, durable when it returns (fsync of every file, then `.metadata`)."""
        path = self.root / f"dcp-{tag}"
        self.dcp.save(self.state, storage_writer=self.dcp.FileSystemWriter(
            str(path), sync_files=True, thread_count=1))
        return path

    def async_save(self, tag: str) -> tuple[Path, float, Callable[[], None]]:
        """dcp.async_save: its path, the seconds until training may go on (the call: staging
        into the cached buffers, then the upload handed to a thread) and a wait until durable."""
        path = self.root / f"dcp-{tag}"
        started = time.perf_counter()
        future = self.dcp.async_save(
            self.state, storage_writer=self.dcp.FileSystemWriter(str(path), sync_files=True,
                                                                 thread_count=1),
            process_group=self.async_pg, async_stager=self.stager)
        stall = time.perf_counter() - started
        return path, stall, future.result

    def load(self, path: Path) -> None:
        """dcp.load into the same (live) tensors; DCP checks no checksum."""
        self.dcp.load(self.state, checkpoint_id=str(path))

    def close(self) -> None:
        self.stager.close()



class AsManager:
    """The peer's asynchronous save behind the checkpoint manager's `save` / `wait`, so that
    bench.checkpoint's throughput rounds (steps, a save, steps during its write) time DCP as
    they time telepathy: its stall right after training steps, and its cost on throughput."""

    def __init__(self, peer: DcpPeer, is_main: bool) -> None:
        self.peer, self.is_main = peer, is_main
        self.pending: tuple[Path, Callable[[], None]] | None = None

    def save(self, engine: Any, step: int, state: dict[str, Any]) -> float:
        path, stall, wait = self.peer.async_save(f"train-{step}")
        self.pending = (path, wait)
        return stall

    def wait(self) -> None:
        import shutil

        path, wait = self.pending
        wait()
        self.pending = None
        if self.is_main:
            shutil.rmtree(path, ignore_errors=True)
