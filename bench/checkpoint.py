"""Checkpoint save and load against the disk itself, torch.save and DeepSpeed, as JSON + a table.

    python -m bench.checkpoint [--smoke] [--model tiny|56M] [--world 1|2] [--peer dcp]
                               [--dir D] [--out F]

On the same model state (a ZeRO-3 engine after 2 training steps) and the same disk, side by side
in one run (this machine is shared and noisy; each figure is the median of --repeats), per rank:
- disk: write + fsync of the same number of bytes (the physical limit), then read it back;
- torch.save of the engine's state (module + optimizer state dicts), with fsync;
- DeepSpeed's own save_checkpoint / load_checkpoint (its default engine: no fsync, no hashes),
  and the fsync of its files afterwards (the cost of making it as durable);
- telepathy: synchronous save, asynchronous save (the stall the training loop sees, and the
  total), and the verified load (verify every chunk, then load) against the unverified load;
- memory: a plain copy of the same bytes into memory already mapped (what a snapshot cannot
  beat), each checksum algorithm over them in memory (`--hash` picks telepathy's), and the host
  memory the process holds during an asynchronous save (peak RSS above the level before it).
- with `--peer dcp`, PyTorch Distributed Checkpoint on the same rank state, in the same repeats
  right after telepathy's figures: dcp.save, dcp.async_save (stall and total) and dcp.load from a
  cold page cache (how DCP is configured, and which state it saves: bench/dcp_peer.py); and
  DCP's asynchronous save in the same throughput rounds as telepathy's (its stall right after
  training steps, and its cost on throughput).
Without --world/--model it runs tiny and 56M at world sizes 1 and 2 (torchrun, gloo on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import add_case_arguments, cases_of, ratios, seconds, write_report

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": [],
    "56M": ["model.hidden_size=512", "model.intermediate_size=1376", "model.num_layers=8",
            "model.num_heads=8", "model.num_kv_heads=4", "model.vocab_size=32000",
            "model.max_seq_len=256", "data.seq_len=256", "data.synthetic_tokens=200000"],
}
BLOCK = 64 * 2**20


def disk_write_read(path: Path, nbytes: int) -> tuple[float, float]:
    """Seconds to write + fsync `nbytes` (incompressible data), then to read them back."""
    block = os.urandom(min(BLOCK, max(nbytes, 1)))
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(memoryview(block)[:min(left, len(block))])
        os.fsync(f.fileno())
    written = time.perf_counter() - started
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(BLOCK):
            pass
    read = time.perf_counter() - started
    path.unlink()
    return written, read


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """The highest VmRSS of this process while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        import threading
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def memory_figures(nbytes: int) -> dict[str, float]:
    """Seconds to copy `nbytes` into a buffer already mapped, and each checksum's GB/s over
    them (one thread; all release the GIL)."""
    import torch

    from telepathy.checkpoint.hashing import HASHES, new_hash

    src = torch.randint(0, 255, (max(nbytes, 1),), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.fill_(1)  # mapped and touched, as the snapshot buffers are from the second save on
    copies = []
    for _ in range(3):
        started = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - started)
    out = {"memcpy_mapped_s": min(copies)}
    view = memoryview(src.numpy()).cast("B")
    for name in HASHES:
        best = 1e9
        for _ in range(2):
            started = time.perf_counter()
            h = new_hash(name)
            h.update(view)
            h.hexdigest()
            best = min(best, time.perf_counter() - started)
        out[f"hash_{name}_GB_per_s"] = round(nbytes / 1e9 / best, 2)
    return out


def drop_cache(directory: Path) -> None:
    """Evict a directory's (durable) files from the page cache: the next read comes from disk."""
    for f in directory.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class GcClock:
    """Seconds Python's cyclic collector has run in this process (gc.callbacks)."""

    def __init__(self) -> None:
        self.s = 0.0
        self._started = 0.0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.s += time.perf_counter() - self._started


GC = GcClock()
PROFILE = os.environ.get("BENCH_PROFILE_STALL")
"""A path prefix: the first throughput round's save is profiled (cProfile) to PREFIX.KIND.RANK."""


def throughput_overhead(train_step, engine, manager, dist, every_steps: int,
                        step: int) -> dict[str, Any]:
    """What one background save costs training, as a share of `every_steps` steps' time.

    Steps without a save (the step time, median of 6) and steps during a save (the stall, then
    3 steps while it is written, then waiting for whatever is left of it) alternate; the extra
    time of the latter over 3 plain steps, divided by every_steps plain steps, is the overhead on
    throughput with a save every `every_steps` steps.
    """
    def timed_steps(n: int) -> list[float]:
        out = []
        for _ in range(n):
            dist.barrier()
            started = time.perf_counter()
            train_step()
            dist.barrier()
            out.append(time.perf_counter() - started)
        return out

    plain, rounds, copied = [], [], []
    for i in range(ROUNDS):
        plain += timed_steps(3)
        dist.barrier()
        started = time.perf_counter()
        collected = GC.s
        if PROFILE and i == 0:
            import cProfile
            profile = cProfile.Profile()
            profile.enable()
        stall = manager.save(engine, step + i, {"step": step + i})
        if PROFILE and i == 0:
            profile.disable()
            profile.dump_stats(f"{PROFILE}.{type(manager).__name__}.{dist.rank}")
        copied.append(getattr(getattr(manager, "writer", None), "copy_s", None))
        collected = GC.s - collected
        during = timed_steps(3)
        manager.wait()
        dist.barrier()
        rounds.append((time.perf_counter() - started, stall, during, collected))
    plain += timed_steps(3)
    step_s = statistics.median(plain)
    extras = [max(dist.all_gather_object(total - 3 * step_s)) for total, *_ in rounds]
    extra = statistics.median(extras)
    computed, not_measured = ratios({"overhead": (extra, every_steps * step_s)}, digits=4)
    return {"every_steps": every_steps, "step_s": seconds(step_s),
            "plain_steps_s": [seconds(x) for x in plain],
            "save_stall_s": [seconds(r[1]) for r in rounds],
            "save_stall_gc_s": [seconds(r[3]) for r in rounds],  # of it, the cyclic collector's
            **({"save_stall_copy_s": [seconds(c) for c in copied]} if None not in copied else {}),
            "steps_during_save_s": [[seconds(x) for x in r[2]] for r in rounds],
            "save_extra_s_per_round": [seconds(x) for x in extras],
            "save_extra_s": seconds(extra),
            # raw: below zero means a save's cost was lost in the steps' own variation
            "overhead": computed["overhead"], **({"why": not_measured["overhead"]}
                                                 if not_measured else {})}


ROUNDS = 3


TARGETS = {  # issue 14: (comparison, bound)
    "telepathy_save_vs_disk_limit": (">=", 0.80),
    "verified_vs_unverified_load": ("<=", 1.20),
    "async_stall_vs_memcpy": ("<=", 1.25),
    "checkpoint_overhead_on_throughput": ("<=", 0.035),
}
DCP_TARGETS = {  # issue 31, with --peer dcp: telepathy's time over DCP's
    "telepathy_sync_save_vs_dcp": ("<=", 1.0),
    "telepathy_async_stall_vs_dcp": ("<=", 1.0),
    "telepathy_verified_load_vs_dcp": ("<=", 1.0),
}


def dcp_why(result: dict[str, Any]) -> dict[str, str]:
    """Why a DCP target is missed, from the figures of the same run."""
    s, q = result["seconds"], result["ratios"]
    return {
        "telepathy_sync_save_vs_dcp": (
            f"until durable telepathy took {s['telepathy_sync_save_durable_s']:.3f} s against "
            f"DCP's {s['dcp_save_s']:.3f} s for {result['dcp']['bytes_vs_telepathy']}x the bytes: "
            f"DeepSpeed's save walk and the RNG state {s['sync_save_stall_s']:.3f} s, files "
            f"written, hashed and fsynced {s['sync_save_write_s']:.3f} s (the raw write + fsync "
            f"of the same bytes: {s['disk_write_fsync_s']:.3f} s)"),
        "telepathy_async_stall_vs_dcp": (
            f"telepathy's stall {s['telepathy_async_stall_s']:.3f} s (of it copies "
            f"{s['telepathy_async_copy_s']:.3f} s; DeepSpeed's own save walk in a synchronous "
            f"save {s['sync_save_stall_s']:.3f} s) against DCP's {s['dcp_async_stall_s']:.3f} s "
            f"(a copy into its cached buffers, dcp_async_stall_vs_memcpy "
            f"{q['dcp_async_stall_vs_memcpy']}); both copy the same bytes into buffers kept "
            "from save to save, telepathy through DeepSpeed's save walk (without the collectives "
            "DeepSpeed's save_checkpoint wraps it in); right after training steps the stalls are "
            f"{s['telepathy_async_stall_after_steps_s']:.3f}"
            f" s and {s['dcp_async_stall_after_steps_s']:.3f} s"),
        "telepathy_verified_load_vs_dcp": (
            f"verify {s['telepathy_verify_s']:.3f} s + load {s['telepathy_load_s']:.3f} s "
            f"against DCP's unverified load {s['dcp_load_s']:.3f} s, both from a cold page cache"),
    }


def start_dcp(engine: Any, root: Path, dist: Any) -> Any:
    """The DCP peer on this engine's state, after one asynchronous save that is not timed (it
    allocates the staging buffers, as telepathy's first save allocates its snapshot buffers);
    the bytes that save wrote, all ranks' files and its `.metadata`."""
    from bench.dcp_peer import DcpPeer, tree_bytes

    peer = DcpPeer(engine, root, dist.world_size)
    path, _, wait = peer.async_save("warm-up")
    wait()
    dist.barrier()
    peer.bytes = tree_bytes(path)
    dist.barrier()
    if dist.is_main:
        shutil.rmtree(path)
    return peer


def dcp_figures(peer: Any, step: int, dist: Any, timed, times: dict[str, list[float]]) -> None:
    """One repeat of DCP: save (until durable), asynchronous save (the stall, on the slowest
    rank, and until durable), then load from a cold page cache into the same tensors."""
    path = timed("dcp_save_s", lambda: peer.save(f"sync-{step}"))
    stall = {}

    def async_save() -> None:
        done, stall["s"], wait = peer.async_save(f"async-{step}")
        wait()
        stall["path"] = done
    timed("dcp_async_total_s", async_save)
    times.setdefault("dcp_async_stall_s", []).append(max(dist.all_gather_object(stall["s"])))
    drop_cache(path)  # as telepathy's load: from the disk
    timed("dcp_load_s", lambda: peer.load(path))
    if dist.is_main:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(stall["path"], ignore_errors=True)
    dist.barrier()


def dcp_ratios(med: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Telepathy's time over DCP's (below 1: telepathy ahead). The synchronous save until its
    manifest is durable (DCP's returns once its `.metadata` is written; telepathy's call also
    prunes older checkpoints afterwards: the whole call is the `_whole_call` ratio)."""
    return {
        "telepathy_sync_save_vs_dcp": (med["telepathy_sync_save_durable_s"], med["dcp_save_s"]),
        "telepathy_sync_save_whole_call_vs_dcp": (med["telepathy_sync_save_s"],
                                                  med["dcp_save_s"]),
        "telepathy_async_stall_vs_dcp": (med["telepathy_async_stall_s"],
                                         med["dcp_async_stall_s"]),
        "telepathy_async_total_vs_dcp": (med["telepathy_async_total_s"],
                                         med["dcp_async_total_s"]),
        "telepathy_verified_load_vs_dcp": (med["telepathy_verify_s"] + med["telepathy_load_s"],
                                           med["dcp_load_s"]),
        "dcp_async_stall_vs_memcpy": (med["dcp_async_stall_s"], med["memcpy_mapped_s"]),
    }


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Each target met or not; for a miss, why, from the figures measured in the same run."""
    s, q = result["seconds"], result["ratios"]
    why = {
        "telepathy_save_vs_disk_limit": (
            f"until durable the save took {s['telepathy_sync_save_durable_s']:.3f} s against "
            f"{s['disk_write_fsync_s']:.3f} s for the raw write + fsync: DeepSpeed's walk of its "
            f"state and the RNG state {s['sync_save_stall_s']:.3f} s, files written, hashed and "
            f"fsynced {s['sync_save_write_s']:.3f} s, the rest the manifest and directory fsyncs"),
        "verified_vs_unverified_load": (
            f"verify {s['telepathy_verify_s']:.3f} s (this rank's files read once into memory and "
            f"hashed) + load {s['telepathy_load_s']:.3f} s against DeepSpeed's load "
            f"{s['deepspeed_load_s']:.3f} s, both from a cold page cache; the disk reads at "
            f"{result['GB_per_s']['disk_read_s']} GB/s warm"),
        "async_stall_vs_memcpy": (
            f"the stall {s['telepathy_async_stall_s']:.3f} s against a copy of the same bytes "
            f"into mapped memory on one thread {s['memcpy_mapped_s']:.3f} s: its copies took "
            f"{s['telepathy_async_copy_s']:.3f} s (async_copy_vs_memcpy "
            f"{q['async_copy_vs_memcpy']}); the rest is DeepSpeed's save walk, without its "
            f"collectives ({s['sync_save_stall_s']:.3f} s in a synchronous save, which copies "
            "nothing), the RNG state and telepathy's barrier"),
        "checkpoint_overhead_on_throughput": (
            f"a save cost {result['throughput']['save_extra_s']:.3f} s of training time against "
            f"{result['throughput']['every_steps']} steps of {result['throughput']['step_s']:.3f} s"
            ": on 2 cores the background write and hashing take CPU from training"),
    }
    if "telepathy_sync_save_vs_dcp" in q:
        why.update(dcp_why(result))
    out = {}
    for key, (op, bound) in {**TARGETS, **DCP_TARGETS}.items():
        if key not in q:
            continue
        value = q[key]
        if value is None:  # a ratio without a denominator: neither met nor missed
            out[key] = {"value": None, "target": f"{op} {bound}", "met": None,
                        "why": result["not_measured"][key]}
            continue
        met = value >= bound if op == ">=" else value <= bound
        out[key] = {"value": value, "target": f"{op} {bound}", "met": met,
                    **({} if met else {"why": why[key]})}
    if (q["checkpoint_overhead_on_throughput"] or 0) < 0:
        out["checkpoint_overhead_on_throughput"]["note"] = (
            "below zero: steps during a save ran as fast as plain steps, the save's cost is "
            "within the steps' own variation")
    return out


def worker(args: argparse.Namespace) -> None:
    """One rank: build the engine, train 2 steps, then time every way of saving and loading."""
    import torch
    import torch.nn.functional as F

    from telepathy.checkpoint.manager import CheckpointManager
    from telepathy.config import load_config
    from telepathy.core.paths import RunPaths
    from telepathy.engine import distributed
    from telepathy.engine.build import build_engine
    from telepathy.plan.placement import choose_layout
    from telepathy.slurm.env import DistEnv

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"
    env = DistEnv.from_mapping(os.environ)
    cfg = load_config(str(ROOT / "configs/tiny-cpu.yaml"), MODELS[args.model])
    layout = choose_layout(cfg.train.global_batch, env.world_size, [8, 4, 2, 1])
    dist = distributed.start(env.rank, env.world_size, env.local_rank, env.master_addr,
                             env.master_port, cuda)
    engine = build_engine(cfg, layout, cuda)

    def train_step() -> None:
        for _ in range(layout.accum):
            ids = torch.randint(0, cfg.model.vocab_size, (layout.micro_batch, cfg.data.seq_len + 1),
                                device=dist.device)
            logits = engine(input_ids=ids[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
            engine.backward(loss)
            engine.step()
    for _ in range(2):
        train_step()
    if args.gc == "freeze":
        # As a telepathy rank settles before its first step (telepathy.train.resume.settle_gc):
        # collect once and freeze the modules, the model and the engine, so that the cyclic
        # collections that allocations trigger later do not rescan them.
        gc.collect()
        gc.freeze()
    ds_engine = engine.checkpoint_engine  # DeepSpeed's default (torch.save, no fsync)
    root = Path(dist.broadcast_object(args.dir if dist.is_main else None))
    paths = RunPaths.at(root / "run")
    sync = CheckpointManager(paths, dist, keep=2, async_save=False, hash_algorithm=args.hash)
    times: dict[str, list[float]] = {}

    def timed(name: str, fn) -> Any:
        dist.barrier()
        started = time.perf_counter()
        out = fn()
        dist.barrier()
        times.setdefault(name, []).append(time.perf_counter() - started)
        return out

    async_manager = CheckpointManager(paths, dist, keep=2, async_save=True,
                                      hash_algorithm=args.hash)
    async_manager.attach(engine)  # one manager for the run: its host buffers are reused
    sync.attach(engine)
    sync.save(engine, 10**6, {"step": 10**6})  # a first save, not timed: the size of this rank's part
    dist.barrier()  # rank 0 writes the manifest after the others are done
    mine = json.loads((paths.checkpoint(10**6) / "MANIFEST.json").read_text())["bytes"] \
        // dist.world_size
    sync.completed()
    dist.barrier()
    if dist.is_main:
        shutil.rmtree(paths.checkpoint(10**6))
    peer = start_dcp(engine, root, dist) if args.peer == "dcp" else None
    step = 0
    pairs: list[float] = []
    for _ in range(args.repeats):
        step += 1
        rw = {}

        def disk() -> None:
            rw["w"], rw["r"] = disk_write_read(root / f"disk_{dist.rank}.bin", mine)
        timed("disk_write_fsync_plus_read_s", disk)
        w, r = zip(*dist.all_gather_object((rw["w"], rw["r"])))
        times.setdefault("disk_write_fsync_s", []).append(max(w))
        times.setdefault("disk_read_s", []).append(max(r))
        sync.attach(engine)
        with PeakRss() as peak:
            base = rss_bytes()
            timed("telepathy_sync_save_s", lambda: sync.save(engine, step, {"step": step}))
        result, = sync.completed()
        durable = dist.broadcast_object(result.durable_s if dist.is_main else None)  # its manifest
        times.setdefault("telepathy_sync_save_durable_s", []).append(durable)
        times.setdefault("sync_save_rss_extra_bytes", []).append(
            max(dist.all_gather_object(peak.peak - base)))
        for part in ("stall_s", "write_s"):  # where a synchronous save's time goes
            times.setdefault(f"sync_save_{part}", []).append(
                max(dist.all_gather_object(getattr(result, part))))
        pairs.append(max(w) / durable)  # the disk and the save, one right after the other
        manifest = json.loads((paths.checkpoint(step) / "MANIFEST.json").read_text())
        total = manifest["bytes"]
        step += 1
        stall = {}
        async_manager.attach(engine)

        def async_save() -> None:
            base = rss_bytes()
            with PeakRss() as peak:
                stall["s"] = async_manager.save(engine, step, {"step": step})
                stall["copy"] = async_manager.wait().copy_s
            stall["rss"] = peak.peak - base
        timed("telepathy_async_total_s", async_save)
        times.setdefault("async_save_rss_extra_bytes", []).append(
            max(dist.all_gather_object(stall["rss"])))
        stall_max = dist.all_gather_object(stall["s"])
        times.setdefault("telepathy_async_stall_s", []).append(max(stall_max))
        times.setdefault("telepathy_async_copy_s", []).append(
            max(dist.all_gather_object(stall["copy"])))

        drop_cache(paths.checkpoints)  # a resume on another node reads from the disk
        found = timed("telepathy_verify_s", lambda: sync.newest_valid()[0])
        timed("telepathy_load_s", lambda: sync.load(engine, found))
        if peer is not None:
            dcp_figures(peer, step, dist, timed, times)

        engine.checkpoint_engine = ds_engine
        timed("deepspeed_save_s", lambda: engine.save_checkpoint(str(root / "ds"), tag=f"t{step}",
                                                                 save_latest=False))

        def fsync_tree() -> None:  # what DeepSpeed's save leaves undone: making it durable
            for f in (root / "ds" / f"t{step}").rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        timed("deepspeed_fsync_after_save_s", fsync_tree)
        drop_cache(root / "ds")
        timed("deepspeed_load_s", lambda: engine.load_checkpoint(
            str(root / "ds"), tag=f"t{step}", load_optimizer_states=True,
            load_lr_scheduler_states=True))
        if dist.is_main:
            shutil.rmtree(root / "ds", ignore_errors=True)

        def torch_save() -> None:
            state = {"module": engine.module_state_dict(), "optimizer": engine.optimizer.state_dict()}
            with open(root / f"torch_{dist.rank}.pt", "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        timed("torch_save_s", torch_save)
        (root / f"torch_{dist.rank}.pt").unlink()

        mem = memory_figures(mine)
        for key, value in mem.items():
            times.setdefault(key, []).append(value)
    overhead = throughput_overhead(train_step, engine, async_manager, dist,
                                   cfg.checkpoint.every_steps, step + 1)
    pool_bytes = max(dist.all_gather_object(async_manager._pinned.nbytes))
    if peer is not None:
        from bench.dcp_peer import AsManager
        dcp_overhead = throughput_overhead(train_step, engine, AsManager(peer, dist.is_main), dist,
                                           cfg.checkpoint.every_steps, step + 1 + ROUNDS)
        peer.close()
    if dist.is_main:
        med = {k: statistics.median(v) for k, v in times.items()}
        hashes = {k.removeprefix("hash_").removesuffix("_GB_per_s"): med.pop(k)
                  for k in [k for k in med if k.startswith("hash_")]}
        rss_extra = med.pop("async_save_rss_extra_bytes")
        sync_rss_extra = med.pop("sync_save_rss_extra_bytes")
        result = {"model": args.model, "world_size": dist.world_size, "bytes": total,
                  "rank_bytes": mine, "cold_cache_loads": True,
                  "hash": args.hash, "hash_GB_per_s_one_thread": hashes,
                  "async_save_rss_extra_bytes": int(rss_extra),
                  "sync_save_rss_extra_bytes": int(sync_rss_extra),
                  "snapshot_buffers_bytes": int(pool_bytes),
                  "throughput": overhead,
                  "parameters": sum(getattr(p, "ds_numel", p.numel())
                                    for p in engine.module.parameters()),
                  "repeats": args.repeats, "seconds": {k: seconds(v) for k, v in med.items()}}
        gbps = lambda s: round(total / 1e9 / s, 3) if s > 0 else None  # noqa: E731
        result["GB_per_s"] = {k: gbps(med[k]) for k in (
            "disk_write_fsync_s", "disk_read_s", "torch_save_s", "deepspeed_save_s",
            "telepathy_sync_save_s", "telepathy_async_total_s")}
        result["ratios"], result["not_measured"] = ratios({
            # the raw write and the save until durable, one right after the other: median of pairs
            "telepathy_save_vs_disk_limit": (statistics.median(pairs), 1.0),
            "telepathy_save_vs_disk_limit_whole_call": (med["disk_write_fsync_s"],
                                                        med["telepathy_sync_save_s"]),
            "async_stall_vs_sync_save": (med["telepathy_async_stall_s"],
                                         med["telepathy_sync_save_s"]),
            "verified_vs_unverified_load": (med["telepathy_verify_s"] + med["telepathy_load_s"],
                                            med["deepspeed_load_s"]),
            "telepathy_sync_save_vs_deepspeed_save": (med["telepathy_sync_save_s"],
                                                      med["deepspeed_save_s"]),
            "telepathy_sync_save_vs_deepspeed_save_plus_fsync": (
                med["telepathy_sync_save_s"],
                med["deepspeed_save_s"] + med["deepspeed_fsync_after_save_s"]),
            "async_stall_vs_deepspeed_save": (med["telepathy_async_stall_s"],
                                              med["deepspeed_save_s"]),
            "telepathy_sync_save_vs_torch_save": (med["telepathy_sync_save_s"],
                                                  med["torch_save_s"]),
            "async_stall_vs_memcpy": (med["telepathy_async_stall_s"], med["memcpy_mapped_s"]),
            # the copy part of the stall alone (the rest is DeepSpeed's own save protocol)
            "async_copy_vs_memcpy": (med["telepathy_async_copy_s"], med["memcpy_mapped_s"]),
            "async_save_rss_extra_vs_rank_bytes": (rss_extra, max(mine, 1)),
            "sync_save_rss_extra_vs_rank_bytes": (sync_rss_extra, max(mine, 1)),
            "snapshot_buffers_vs_rank_bytes": (pool_bytes, max(mine, 1)),
        })
        if peer is not None:
            result["dcp"] = {**peer.describe, "bytes": peer.bytes,
                             "bytes_vs_telepathy": round(peer.bytes / max(total, 1), 4),
                             "throughput": dcp_overhead}
            after_steps = {  # the stall right after training steps (rank 0), median of ROUNDS
                "telepathy": statistics.median(overhead["save_stall_s"]),
                "dcp": statistics.median(dcp_overhead["save_stall_s"])}
            result["seconds"]["telepathy_async_stall_after_steps_s"] = seconds(
                after_steps["telepathy"])
            result["seconds"]["dcp_async_stall_after_steps_s"] = seconds(after_steps["dcp"])
            measured, why_not = ratios({**dcp_ratios(med),
                                        "telepathy_async_stall_after_steps_vs_dcp": (
                                            after_steps["telepathy"], after_steps["dcp"])})
            result["ratios"].update(measured)
            result["not_measured"].update(why_not)
        result["ratios"]["checkpoint_overhead_on_throughput"] = overhead["overhead"]
        if peer is not None:
            result["ratios"]["dcp_checkpoint_overhead_on_throughput"] = dcp_overhead["overhead"]
            if dcp_overhead["overhead"] is None:
                result["not_measured"]["dcp_checkpoint_overhead_on_throughput"] = \
                    dcp_overhead["why"]
        if overhead["overhead"] is None:
            result["not_measured"]["checkpoint_overhead_on_throughput"] = overhead["why"]
        result["targets"] = targets(result)
        Path(args.result).write_text(json.dumps(result))
    import torch.distributed
    torch.distributed.destroy_process_group()


def run_case(model: str, world: int, repeats: int, base: Path,
             hash_: str = "xxh3_128", peer: str | None = None,
             gc_mode: str = "freeze") -> dict[str, Any]:
    from telepathy.core import proc

    work = Path(tempfile.mkdtemp(prefix=f"ckpt-{model}-w{world}-", dir=base))
    result = work / "result.json"
    cmd = ["-m", "bench.checkpoint", "--worker", "--model", model, "--repeats", str(repeats),
           "--dir", str(work), "--result", str(result), "--hash", hash_, "--gc", gc_mode,
           *(["--peer", peer] if peer else [])]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", *cmd]
    else:
        cmd = [sys.executable, *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        proc.run(cmd, timeout=3600, env=env, cwd=ROOT)
        return json.loads(result.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(p, list(MODELS), repeats=3)
    p.add_argument("--hash", default="xxh3_128", help="telepathy's checksum (checkpoint.hash)")
    p.add_argument("--peer", choices=["dcp"], help="also PyTorch Distributed Checkpoint on the "
                   "same state, interleaved (bench/dcp_peer.py)")
    p.add_argument("--gc", choices=["freeze", "plain"], default="freeze",
                   help="freeze: the collector as in a telepathy rank (its objects frozen after "
                   "start-up); plain: Python's default")
    p.add_argument("--dir", default=str(ROOT / "runs" / "bench"), help="where to write (the disk)")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    cases, repeats = cases_of(args, list(MODELS))
    results = [run_case(m, w, repeats, base, args.hash, args.peer, args.gc) for m, w in cases]
    report = {"disk": str(base), "results": results}
    for r in results:
        s, g, q = r["seconds"], r["GB_per_s"], r["ratios"]
        print(f"{r['model']:>5} world {r['world_size']}: {r['bytes'] / 1e6:8.1f} MB | disk "
              f"{s['disk_write_fsync_s']:.3f} s ({g['disk_write_fsync_s']} GB/s) | torch.save "
              f"{s['torch_save_s']:.3f} | DeepSpeed {s['deepspeed_save_s']:.3f} | telepathy sync "
              f"{s['telepathy_sync_save_s']:.3f}, async stall {s['telepathy_async_stall_s']:.3f} "
              f"total {s['telepathy_async_total_s']:.3f} | load: DeepSpeed "
              f"{s['deepspeed_load_s']:.3f}, verify {s['telepathy_verify_s']:.3f} + load "
              f"{s['telepathy_load_s']:.3f}" + (
                  f" | DCP save {s['dcp_save_s']:.3f}, async stall {s['dcp_async_stall_s']:.3f} "
                  f"total {s['dcp_async_total_s']:.3f}, load {s['dcp_load_s']:.3f}"
                  if "dcp_save_s" in s else "") + f" | ratios {q}", file=sys.stderr)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
