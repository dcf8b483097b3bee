"""The plain DeepSpeed loop a user would write instead of telepathy: the peer of
`python -m bench.train_step --peer deepspeed`.

    python -m bench.bare_loop --config C --out-dir D [--set key=value ...]   (torchrun for N ranks)

The same model, optimizer, LR schedule and DeepSpeed config as telepathy (telepathy.engine.build's
`build_engine`: writing them again here would compare two configurations, not two loops), the same
placement (micro-batch x accumulation) and the same batches (telepathy's synthetic corpus and its
sampling order); then forward, backward, step and `engine.save_checkpoint` every
`checkpoint.every_steps` steps (DeepSpeed's own: no fsync, no manifest), and one at the end.
No signals, watchdog, heartbeat, metrics file, monitor or trackers. Rank 0 writes one line per
step to D/steps.jsonl: the step, its loss and the wall time once the step (and its save) is done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    from telepathy.config import load_config
    from telepathy.data.stream import TokenStream, generate_corpus, rank_slice
    from telepathy.engine.build import build_engine
    from telepathy.train.inputs import make_plan

    cfg = load_config(args.config, args.set)
    out = Path(args.out_dir)
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:  # one process without a launcher: a group of one
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    # As telepathy does (FACTS: ~46 s of JIT build on a new machine, losses unchanged): skip the
    # shared-memory op, so the two arms start alike and the smoke stays short.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    layout = make_plan(cfg, world, gpu_mem_gib=None).layout
    engine = build_engine(cfg, layout, cuda)
    tokens = generate_corpus(cfg.data.synthetic_tokens, cfg.model.vocab_size, cfg.data.seed)
    stream = TokenStream(tokens, cfg.data.seq_len, cfg.data.seed, cfg.model.vocab_size)
    log = open(out / "steps.jsonl", "w") if rank == 0 else None
    for step in range(1, cfg.train.steps + 1):
        ids = stream.sample_ids((step - 1) * layout.global_batch, layout.global_batch)
        for micro_step in range(layout.accum):
            batch = stream.inputs(rank_slice(ids, micro_step, rank, world, layout.micro_batch))
            logits = engine(input_ids=torch.from_numpy(batch["input_ids"]).to(device)).logits
            labels = torch.from_numpy(batch["labels"]).to(device)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))
            engine.backward(loss)
            engine.step()
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 \
                and step < cfg.train.steps:
            engine.save_checkpoint(str(out / "checkpoints"), tag=f"step{step}")
        if log:
            log.write(json.dumps({"step": step, "loss": loss.item(), "time": time.time()}) + "\n")
    engine.save_checkpoint(str(out / "checkpoints"), tag=f"step{cfg.train.steps}")
    if log:
        log.close()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
