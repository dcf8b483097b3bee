"""Export a run's weights as a Hugging Face model directory.

The checkpoint: the newest one whose every file matches its manifest (or `--step N`, refused
when it does not verify); verified before anything is read. The weights: DeepSpeed's own
`zero_to_fp32` consolidation of the ZeRO-3 fp32 master weights (whatever world size wrote
them), gathered one parameter at a time from memory-mapped files, cast, and written shard by
shard, so memory holds one shard and the largest tensor. The directory: written under a temp
name beside `--out` and renamed at the end, so it appears whole or not at all; the run
directory is only read (no lock), so export runs beside a training job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import __version__
from ..checkpoint import directory
from ..checkpoint.hashing import verify_all
from ..checkpoint.manifest import MANIFEST, STATE
from ..config import config_from_dict
from ..core.errors import CheckpointError, TelepathyError
from ..core.fsutil import fsync_dir
from ..core.paths import RunPaths
from ..engine import adapter, finetune
from ..engine.build import model_config
from .shards import INDEX, plan_shards, shard_names

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROVENANCE = "telepathy-export.json"


@dataclass(frozen=True)
class Exported:
    out: str
    checkpoint: str
    step: int
    world_size: int
    dtype: str
    tensors: int
    bytes: int
    files: list[str]
    seconds: float


class Gone(CheckpointError):
    """The checkpoint was deleted (a running job prunes old ones) while it was exported."""


def _problems(ckpt: Path) -> list[str]:
    """What is wrong with a checkpoint; Gone when it is no longer there (pruned meanwhile)."""
    manifest = directory.read_manifest(ckpt)
    if manifest is None:
        raise Gone(ckpt.name)
    try:
        return verify_all(ckpt, manifest)
    except FileNotFoundError:
        raise Gone(ckpt.name) from None


def choose_checkpoint(paths: RunPaths, step: int | None) -> Path:
    """The newest checkpoint that verifies, or that of `step`; an error that says what exists."""
    complete = directory.complete_steps(paths.checkpoints)
    if not complete:
        raise CheckpointError(f"{paths.checkpoints} holds no complete checkpoint; export a run "
                              "that has saved one (telepathy checkpoint list shows them)")
    if step is not None:
        if step not in complete:
            raise CheckpointError(f"--step {step}: no complete checkpoint of that step in "
                                  f"{paths.checkpoints}; complete ones: "
                                  f"{', '.join(map(str, reversed(complete)))}")
        ckpt = paths.checkpoint(step)
        problems = _problems(ckpt)
        if problems:
            raise CheckpointError(f"checkpoint {ckpt.name} does not verify, nothing exported: "
                                  f"{'; '.join(problems[:5])}. Export another --step (complete "
                                  f"ones: {', '.join(map(str, reversed(complete)))})")
        return ckpt
    for s in reversed(complete):
        ckpt = paths.checkpoint(s)
        try:
            problems = _problems(ckpt)
        except Gone:
            continue  # pruned since it was listed: an older one is fine
        if not problems:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt.name, "; ".join(problems[:3]))
    raise CheckpointError(f"no checkpoint in {paths.checkpoints} verifies; see "
                          "telepathy checkpoint verify")


def hf_config(state: dict[str, Any], dtype: torch.dtype, tokenizer: Path):
    """The transformers config of the run's model (its pretrained config, or one built from the
    run's model fields), ready for inference, with the special tokens of the run's tokenizer
    (or at least the EOS its data was prepared with)."""
    cfg = config_from_dict(state["config"])
    if cfg.model.pretrained_path:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(cfg.model.pretrained_path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TelepathyError(f"the run's base model, model.pretrained_path="
                                 f"{cfg.model.pretrained_path!r}, cannot be read ({exc}); export "
                                 "needs its config.json: mount or restore it") from None
        config.dtype = dtype
    else:
        config = model_config(cfg, dtype)
    config.use_cache = True
    special = {"eos_token_id": (state.get("data") or {}).get("eos_token_id")}
    if (tokenizer / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        special = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
                   "pad_token_id": tok.pad_token_id}
    for key, value in special.items():
        if value is not None:
            setattr(config, key, value)
    return config


def _check_out(out: Path, paths: RunPaths) -> None:
    if out.exists():
        raise TelepathyError(f"--out {out} already exists; export into a new directory (or "
                             "remove it first)")
    root = paths.root.resolve()
    if out.resolve() == root or root in out.resolve().parents:
        raise TelepathyError(f"--out {out} is inside the run directory {paths.root}; export "
                             "never writes there, choose a directory outside it")


def export(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: str = "float32",
           shard_bytes: int = 5 * 10**9, adapter_only: bool = False) -> Exported:
    started = time.time()
    adapter.use_cpu_accelerator(override=False)  # consolidation runs on the CPU, login nodes too
    paths = RunPaths.at(run_dir)
    out = Path(out).absolute()
    if dtype not in DTYPES:
        raise TelepathyError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    _check_out(out, paths)
    _remove_leftovers(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    ckpt = None
    try:
        ckpt = choose_checkpoint(paths, step)
        state = json.loads((ckpt / STATE).read_text())
        manifest_sha = (ckpt / MANIFEST).read_bytes()
        tmp.mkdir(parents=True)
        result = _write_any(tmp, ckpt, state, paths, DTYPES[dtype], shard_bytes, adapter_only)
        (tmp / PROVENANCE).write_text(json.dumps({
            "run_dir": str(paths.root), "checkpoint": ckpt.name, "step": state["step"],
            "world_size": state["world_size"], "dtype": dtype, "adapter": adapter_only,
            "telepathy_version": __version__,
            "manifest_sha256": hashlib.sha256(manifest_sha).hexdigest(),
            "created": time.time()}, indent=1) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except (Gone, FileNotFoundError, ValueError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        gone = isinstance(exc, (Gone, FileNotFoundError)) or (
            ckpt is not None and not directory.is_complete(ckpt))  # DeepSpeed: files missing
        if not gone:
            raise
        name = ckpt.name if ckpt is not None else str(exc)
        raise CheckpointError(f"checkpoint {name} went away while it was exported ({exc}); a "
                              f"running job prunes old checkpoints. Nothing was written to "
                              f"{out}; run export again (it takes the newest valid one)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files, tensors, size = result
    return Exported(str(out), ckpt.name, state["step"], state["world_size"], dtype, tensors, size,
                    sorted(files + [PROVENANCE]), round(time.time() - started, 3))


def _write_any(tmp: Path, ckpt: Path, state: dict[str, Any], paths: RunPaths, dtype: torch.dtype,
               shard_bytes: int, adapter_only: bool) -> tuple[list[str], int, int]:
    """The run's kind of export into `tmp`: a module's trained parameters, a fine-tuned model
    (merged, or its adapter), or a model trained whole."""
    cfg = config_from_dict(state["config"])
    if adapter_only and cfg.model.lora.r == 0:
        raise TelepathyError(f"--adapter: run {paths.root} trains no LoRA adapter "
                             "(model.lora.r is 0); export it without --adapter")
    if cfg.model.module is not None:
        from .module import write_module

        return write_module(tmp, ckpt, state, paths)
    if finetune.fine_tuning(cfg):
        return _write_finetuned(tmp, ckpt, state, dtype, shard_bytes, paths.tokenizer,
                                adapter_only)
    return _write(tmp, ckpt, state, dtype, shard_bytes, paths.tokenizer)


def _write(tmp: Path, ckpt: Path, state: dict[str, Any], dtype: torch.dtype, shard_bytes: int,
           tokenizer: Path) -> tuple[list[str], int, int]:
    """config, generation config, the run's tokenizer (if it has one) and weight shards into
    `tmp`: (files, tensors, weight bytes)."""
    from transformers import GenerationConfig

    config = hf_config(state, dtype, tokenizer)
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    ours = {"config.json", "generation_config.json", INDEX, PROVENANCE}
    tokenizer_files = sorted(p.name for p in tokenizer.glob("*") if p.is_file()
                             and not p.name.startswith(".") and p.name not in ours
                             and not p.name.endswith(".safetensors"))
    for name in tokenizer_files:
        shutil.copyfile(tokenizer / name, tmp / name)
    weights = adapter.fp32_weights(ckpt, lazy=True)
    seen: set[int] = set()  # tied weights appear under two names: written once, retied on load
    weights = {n: w for n, w in weights.items() if not (id(w) in seen or seen.add(id(w)))}
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [(name, itemsize * _numel(adapter.weight_shape(w))) for name, w in weights.items()]
    shards = plan_shards(sizes, shard_bytes)
    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    for file, members in zip(names, shards):
        tensors = {n: _cast(adapter.materialize(weights[n]), dtype) for n in members}
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(members, file))
        log.info("exported %s: %d tensors", file, len(members))
        del tensors
    total = sum(size for _, size in sizes)
    files = ["config.json", "generation_config.json", *tokenizer_files, *names]
    if len(names) > 1:
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                             "weight_map": weight_map}, indent=2) + "\n")
        files.append(INDEX)
    return files, len(sizes), total


def _write_finetuned(tmp: Path, ckpt: Path, state: dict[str, Any], dtype: torch.dtype,
                     shard_bytes: int, tokenizer: Path, adapter_only: bool
                     ) -> tuple[list[str], int, int]:
    """A run with a frozen part: the base (model.pretrained_path, verified against the run's
    record; or, built from scratch, the frozen weights the checkpoint holds) with the trained
    weights of the checkpoint (DeepSpeed's zero_to_fp32) loaded into it, LoRA added as the run
    added it. Written merged (peft's merge_and_unload: a plain transformers model), or with
    `adapter_only` the adapter as peft saves it. Holds the whole model in memory, in fp32."""
    from transformers import AutoModelForCausalLM

    cfg = config_from_dict(state["config"])
    run = ckpt.parent.parent
    if cfg.model.pretrained_path:
        from ..checkpoint import basemodel as base
        from ..core.paths import RunPaths

        try:
            base.check(cfg, RunPaths.at(run))
        except TelepathyError as exc:
            raise TelepathyError(f"cannot export: {exc}") from None
        model = AutoModelForCausalLM.from_pretrained(cfg.model.pretrained_path,
                                                     dtype=torch.float32, local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_config(model_config(cfg, torch.float32))
    model = finetune.prepare(model, cfg)
    trained = {n: adapter.materialize(w) for n, w in adapter.fp32_weights(ckpt, lazy=True).items()}
    # A tied weight that trains is in the checkpoint under each of its names (zero_to_fp32 adds
    # DeepSpeed's shared_params, e.g. lm_head.weight beside model.embed_tokens.weight): both
    # name the one tensor, and loading both keeps the tie.
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    unknown = sorted(set(trained) - names - set(dict(model.named_buffers())))
    untrained = sorted(n for n, p in model.named_parameters() if p.requires_grad
                       and n not in trained)
    if unknown or untrained:
        raise CheckpointError(f"checkpoint {ckpt.name} does not fit the run's model: "
                              f"{len(unknown)} unknown tensors ({', '.join(unknown[:3])}), "
                              f"{len(untrained)} trained parameters missing "
                              f"({', '.join(untrained[:3])})")
    beside = sorted(finetune.canonical(n) for n in trained if not finetune.is_lora(n))
    if adapter_only and beside:
        raise TelepathyError(f"--adapter: run {run} trains more than LoRA adapters "
                             f"(model.trainable: {', '.join(beside[:3])}"
                             f"{', ...' if len(beside) > 3 else ''}), which a peft adapter does "
                             "not carry; export it merged (without --adapter)")
    model.load_state_dict(trained, strict=False)
    config = hf_config(state, dtype, tokenizer)
    if adapter_only:
        model.save_pretrained(tmp, safe_serialization=True)
        return sorted(p.name for p in tmp.iterdir()), *_written(tmp)
    if cfg.model.lora.r > 0:
        model = model.merge_and_unload()
    model = model.to(dtype)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(config, key, None) is not None:
            setattr(model.config, key, getattr(config, key))
    model.config.use_cache = True
    model.save_pretrained(tmp, max_shard_size=shard_bytes, safe_serialization=True)
    ours = {p.name for p in tmp.iterdir()}
    for f in sorted(tokenizer.glob("*")) if tokenizer.is_dir() else []:
        if f.is_file() and not f.name.startswith(".") and f.name not in ours:
            shutil.copyfile(f, tmp / f.name)
    return sorted(p.name for p in tmp.iterdir()), *_written(tmp)


def _written(tmp: Path) -> tuple[int, int]:
    """(tensors, weight bytes) of the safetensors files in `tmp`, from their headers: what was
    written, a tied weight once (save_pretrained writes it under one name; `state_dict()` lists
    it under each)."""
    tensors = size = 0
    for file in tmp.glob("*.safetensors"):
        with open(file, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        header.pop("__metadata__", None)
        tensors += len(header)
        size += sum(end - start for start, end in (e["data_offsets"] for e in header.values()))
    return tensors, size


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors to the export's dtype; integer and bool buffers as they are."""
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()


def _remove_leftovers(out: Path) -> None:
    """Temp directories of exports to `out` whose process is gone (killed mid-export)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def as_dict(result: Exported) -> dict[str, Any]:
    return asdict(result)
