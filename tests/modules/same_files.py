"""One rank of test_interop's comparison: a ZeRO-3 engine (the test config, some parameters
frozen), trained 2 steps, saved by telepathy's collective-free walk (adapter.save_checkpoint) and
by DeepSpeed's own save_checkpoint, with frozen parameters excluded and not. Writes what each
wrote (torch.save, no hashing) under OUT/telepathy-E and OUT/deepspeed-E (E: the exclusion),
and, per rank, OUT/rank-R.json: whether the collective-free path ran and whether every persistent
parameter's data came back. Run with torch.distributed.run: python tests/modules/same_files.py OUT
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ["DS_ACCELERATOR"] = "cpu"

from telepathy.config import load_config  # noqa: E402
from telepathy.engine import adapter, distributed  # noqa: E402
from telepathy.engine.build import build_engine  # noqa: E402
from telepathy.plan.placement import choose_layout  # noqa: E402
from telepathy.slurm.env import DistEnv  # noqa: E402


def main(out: Path) -> None:
    env = DistEnv.from_mapping(os.environ)
    cfg = load_config(str(ROOT / "configs" / "tiny-cpu.yaml"),
                      ["model.trainable=['*layers.1.*', 'model.norm.*', 'lm_head.*']"])
    layout = choose_layout(cfg.train.global_batch, env.world_size, [8, 4, 2, 1])
    dist = distributed.start(env.rank, env.world_size, env.local_rank, env.master_addr,
                             env.master_port, False)
    engine = build_engine(cfg, layout, False)
    torch.manual_seed(0)
    for _ in range(2 * layout.accum):
        ids = torch.randint(0, cfg.model.vocab_size, (layout.micro_batch, cfg.data.seq_len + 1))
        logits = engine(input_ids=ids[:, :-1]).logits
        engine.backward(F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()))
        engine.step()
    deepspeeds = engine.checkpoint_engine
    persistent = {id(p): p.data.numel() for p in engine.module.parameters()
                  if getattr(p, "ds_persist", False)}
    report = {"persistent": len(persistent)}
    for exclude in (False, True):
        adapter.install_checkpoint_engine(engine, lambda state, path: torch.save(state, path))
        report[f"local-{exclude}"] = adapter.save_checkpoint(
            engine, str(out / f"telepathy-{exclude}"), "t", exclude)
        engine.checkpoint_engine = deepspeeds
        engine.save_checkpoint(str(out / f"deepspeed-{exclude}"), tag="t", client_state={},
                               save_latest=False, exclude_frozen_parameters=exclude)
    report["restored"] = all(p.data.numel() == persistent[id(p)] for p in engine.module.parameters()
                             if id(p) in persistent)
    (out / f"rank-{dist.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    distributed.stop()  # destroy the process group: exiting with it live can abort (SIGABRT)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
