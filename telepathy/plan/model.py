"""The run's model as the planner sees it: its shape (config.json of model.pretrained_path, or
the model fields) and, where memory is checked, its parameters counted from the model itself
(transformers' `from_config` on the meta device, with LoRA added and the frozen ones known)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config
from ..core.errors import ConfigError
from .memory import ModelShape
from .placement import shape_of

LLAMA_FORMULA = ("llama", "mistral", "qwen2")
"""From-scratch archs whose parameters memory.ModelShape's formula counts exactly."""


def pretrained_config(cfg: Config) -> dict | None:
    """The config.json of model.pretrained_path as a dict (None without one)."""
    if not cfg.model.pretrained_path:
        return None
    path = Path(cfg.model.pretrained_path) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.pretrained_path={cfg.model.pretrained_path!r}: cannot read its "
                          f"config.json ({exc.__class__.__name__}: {exc}); point it at a local "
                          "Hugging Face model directory") from None


POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length",
                 "max_sequence_length")


def limits(cfg: Config) -> tuple[int, int | None]:
    """(vocabulary size, longest sequence) of the run's model: the pretrained model's own
    config.json, or the model fields. The longest sequence is None when the config names none
    (a model without learned positions)."""
    hf = pretrained_config(cfg)
    if hf is None:
        return cfg.model.vocab_size, cfg.model.max_seq_len
    text = hf.get("text_config") or hf
    positions = next((text[k] for k in POSITION_KEYS if text.get(k)), None)
    return shape_of(cfg, hf).vocab, positions


def model_shape(cfg: Config, count: bool, run_dir: Path | None = None) -> ModelShape:
    """The shape of the run's model; `count`: parameters (all, trainable) counted from the
    model itself, needed to check memory (a few seconds: transformers is imported), not for
    the layout alone. Counting is skipped where the formula is exact (a Llama-family model
    built from scratch, every parameter trained). A model.module is counted on the meta
    device, else as a start of the run in `run_dir` measured it (module_counts)."""
    hf = pretrained_config(cfg)
    from ..engine import finetune

    if cfg.model.module is not None:
        return shape_of(cfg, None, *(module_counts(cfg, run_dir) if count else (None, None)))

    if not count or (hf is None and cfg.model.arch in LLAMA_FORMULA
                     and not finetune.fine_tuning(cfg)):
        return shape_of(cfg, hf)
    total, trainable = finetune.count(cfg, _transformers_config(cfg))
    return shape_of(cfg, hf, total, trainable)


def _transformers_config(cfg: Config):
    import torch
    from transformers import AutoConfig

    from ..engine.build import model_config

    if cfg.model.pretrained_path:
        return AutoConfig.from_pretrained(cfg.model.pretrained_path, local_files_only=True)
    return model_config(cfg, torch.float32)


def module_counts(cfg: Config, run_dir: Path | None) -> tuple[int | None, int | None]:
    """(all, trainable) parameters of model.module: built on the meta device, or as recorded
    at a start of the run (RUN_DIR/module-shape.json); (None, None) when neither can tell."""
    from ..core.paths import RunPaths
    from ..engine.usercode import build_on_meta

    built = build_on_meta(cfg)
    if built.module is not None:
        return built.total, built.trainable
    record = RunPaths.at(run_dir).module_shape if run_dir else None
    if record is not None and record.is_file():
        counts = json.loads(record.read_text())
        return counts["parameters"], counts["trainable"]
    return None, None
