"""Snapshot, then persist: the part of a save that runs while training goes on.

`TelepathyCheckpointEngine` plugs into DeepSpeed's checkpoint-engine mechanism (DeepSpeed keeps
writing its own ZeRO-3 layout and calls `save(state_dict, path)` once per file). Each call copies
the state to host memory (CUDA: into pinned buffers reused from save to save; CPU: a copy) and
queues the file; `Writer` threads serialise the snapshots with torch.save straight into
`HashingFile`s (hashed in the same pass, fsynced), several files at once. The training loop
waits only for the copies.
"""

from __future__ import annotations

import copy
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.serialization import config as serialization_config

from .manifest import HashingFile, write_hashed

log = logging.getLogger(__name__)

WRITE_THREADS = 4


class PinnedPool:
    """Host buffers for snapshots, kept from one save to the next (by slot): copying into memory
    already mapped is several times faster than into fresh memory (measured: 0.08 s against
    0.55 s for 670 MB on this machine). On CUDA they are pinned, for asynchronous copies.
    The price: host memory for one copy of this rank's checkpoint, held between saves."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def take(self, slot: tuple, like: torch.Tensor) -> torch.Tensor:
        key = (*slot, tuple(like.shape), like.dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu",
                              pin_memory=torch.cuda.is_available())
            self._buffers[key] = buf
        return buf


def snapshot(obj: Any, pool: PinnedPool | None, slot: tuple = ()) -> Any:
    """A host copy of a (nested) state: tensors copied, everything else deep-copied.

    Device tensors go into pinned buffers with non-blocking copies; the caller synchronises once.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if pool is None:
            return t.to("cpu", copy=True)
        buf = pool.take(slot, t)
        buf.copy_(t, non_blocking=t.device.type != "cpu")
        return buf
    if isinstance(obj, dict):
        items = [(k, snapshot(v, pool, (*slot, k))) for k, v in obj.items()]
        try:
            return type(obj)(items)  # dict, OrderedDict
        except TypeError:
            return dict(items)
    if isinstance(obj, list):
        return [snapshot(v, pool, (*slot, i)) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        items = [snapshot(v, pool, (*slot, i)) for i, v in enumerate(obj)]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return copy.deepcopy(obj)


class Writer:
    """Background writes of one save on one rank. Files are written concurrently."""

    def __init__(self, threads: int = WRITE_THREADS, serialization_zip: bool = False):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="ckpt-write")
        self._hash_pool = ThreadPoolExecutor(threads, thread_name_prefix="ckpt-hash")
        self._sync_pool = ThreadPoolExecutor(threads, thread_name_prefix="ckpt-sync")
        self.zip = serialization_zip
        # The zip format's CRC-32 of every record is redundant with the manifest's SHA-256
        # chunks, verified before any load; without it torch.save runs ~1.4x faster (measured
        # here: 0.89 s against 1.25 s for 670 MB). Process-wide: telepathy's saves all come here.
        serialization_config.save.compute_crc32 = False
        self.jobs: list[tuple[str, Future]] = []
        self.lock = threading.Lock()

    def _torch_save(self, state: Any, path: Path) -> dict[str, Any]:
        f = HashingFile(path, self._hash_pool, sync_pool=self._sync_pool)
        try:
            torch.save(state, f, _use_new_zipfile_serialization=self.zip)
        except BaseException as exc:
            f.abort()
            if f.error is not None:
                raise f.error from exc  # the real cause (e.g. no space left on device)
            raise
        return f.close()

    def submit_state(self, name: str, state: Any, path: Path) -> None:
        with self.lock:
            self.jobs.append((name, self._pool.submit(self._torch_save, state, path)))

    def submit_bytes(self, name: str, data: bytes, path: Path) -> None:
        with self.lock:
            self.jobs.append((name, self._pool.submit(write_hashed, path, data, self._hash_pool)))

    def take_jobs(self) -> list[tuple[str, Future]]:
        with self.lock:
            jobs, self.jobs = self.jobs, []
        return jobs


def _deepspeed_base():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
    return CheckpointEngine


def make_checkpoint_engine(writer: Writer, root: Callable[[], Path | None],
                           pinned: PinnedPool | None):
    """A DeepSpeed CheckpointEngine that snapshots each file's state and hands it to `writer`.

    `root()` names the checkpoint directory being saved (file names in the manifest are
    relative to it); loads are plain torch.load of files verified before.
    """
    base = _deepspeed_base()

    class TelepathyCheckpointEngine(base):
        def __init__(self) -> None:
            super().__init__(None)
            self.name = "TelepathyCheckpointEngine"

        def create(self, info) -> None:
            pass

        def save(self, state_dict, path: str) -> None:
            ckpt = root()
            rel = str(Path(path).resolve().relative_to(ckpt.resolve()))
            state = snapshot(state_dict, pinned, (rel,))
            if torch.cuda.is_available():
                torch.cuda.current_stream().synchronize()  # the non-blocking copies are done
            writer.submit_state(rel, state, Path(path))

        def load(self, path: str, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=False)

        def commit(self, info) -> bool:
            return True

    return TelepathyCheckpointEngine()
