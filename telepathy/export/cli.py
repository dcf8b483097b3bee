"""`telepathy export RUN_DIR --out DIR` (`python -m telepathy.export`): the run's weights as a
Hugging Face model directory that `AutoModelForCausalLM.from_pretrained(DIR)` loads offline.

    telepathy export runs/llama --out models/llama            # newest verified checkpoint
    telepathy export runs/llama --out models/llama-4k --step 4000 --dtype bfloat16
    telepathy export runs/lora --out models/lora-merged         # LoRA merged into the base
    telepathy export runs/lora --out models/lora --adapter      # the adapter, as peft saves it
    telepathy export runs/sft --out models/sft-best --best      # checkpoint.keep_best's best
    telepathy export s3://bucket/runs/llama --out models/llama  # from the mirror (downloaded and
                                                                # verified first)

Exit status: 0 exported, 2 bad input (no valid checkpoint, --out exists, a bad --step), 1 crash.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from ..core import exits, logs
from ..core.errors import TelepathyError
from .shards import parse_size

log = logging.getLogger("telepathy.export")


def best_step(run_dir: str, step: int | None) -> int:
    """The step of the run's best checkpoint, or an error that says why there is none."""
    from ..checkpoint.directory import best_step as recorded
    from ..core.paths import RunPaths

    if step is not None:
        raise TelepathyError(f"--best and --step {step}: give one of them")
    best = recorded(RunPaths.at(run_dir))
    if best is None:
        raise TelepathyError(f"--best: the newest checkpoint of {run_dir} records no best "
                             "checkpoint; run with eval.path, eval.every_steps and "
                             "checkpoint.keep_best: true, or export with --step")
    return best


def from_mirror(args: argparse.Namespace, tmp: Path) -> Path:
    """A run directory in `tmp` holding the mirror's checkpoint to export (the newest, --step's,
    or, with --best, the best the newest records), downloaded and verified."""
    from ..checkpoint.directory import best_step as recorded
    from ..checkpoint.mirror import download_for_reading
    from ..core.paths import RunPaths

    if args.best and args.step is not None:
        raise TelepathyError(f"--best and --step {args.step}: give one of them")
    download_for_reading(args.run_dir, args.step, tmp)
    if args.best:
        best = recorded(RunPaths.at(tmp))
        if best is None:
            raise TelepathyError(f"--best: the newest checkpoint of {args.run_dir} records no "
                                 "best checkpoint; export with --step")
        if not RunPaths.at(tmp).checkpoint(best).exists():
            download_for_reading(args.run_dir, best, tmp)
        args.step, args.best = best, False
    return tmp


def main(argv: list[str] | None = None) -> int:
    from ..checkpoint.mirror import is_url

    logs.configure(0)
    p = argparse.ArgumentParser(prog="telepathy export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (the --run-dir of telepathy resume), or its "
                   "mirror's URL (checkpoint.mirror)")
    p.add_argument("--out", required=True, help="the model directory to create (must not exist)")
    p.add_argument("--step", type=int, help="export this step's checkpoint (default: the newest "
                                            "that verifies)")
    p.add_argument("--best", action="store_true",
                   help="export the best checkpoint (the lowest eval_loss; checkpoint.keep_best)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--adapter", action="store_true",
                   help="a LoRA run: write the adapter as peft saves it (adapter_config.json, "
                        "adapter_model.safetensors; PeftModel.from_pretrained on the base loads "
                        "it) instead of the merged model")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    args = p.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="telepathy-export-") as tmp:
            run_dir = from_mirror(args, Path(tmp)) if is_url(args.run_dir) else args.run_dir
            if args.best:
                args.step = best_step(run_dir, args.step)
            shard_bytes = parse_size(args.shard_size)
            from .hf import as_dict, export  # torch, transformers: after the arguments are checked

            result = export(run_dir, args.out, args.step, args.dtype, shard_bytes, args.adapter)
    except (TelepathyError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return exits.BAD_INPUT
    if args.json:
        print(json.dumps(as_dict(result), indent=1))
    else:
        print(f"exported {result.checkpoint} (step {result.step}, written by {result.world_size} "
              f"rank(s)) to {result.out}: {result.tensors} tensors, {result.bytes / 1e6:.1f} MB "
              f"{result.dtype} in {len(result.files)} files, {result.seconds:.1f} s")
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
