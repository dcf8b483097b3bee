"""What can be checked before torch is imported: the data file (and its sidecar against the
model), the pretrained model's directory, and that a placement exists. `telepathy resume` runs
this right after reading the config and watching its signals, so a bad input fails in a second
and no signal is lost."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from ..config.schema import Config
from ..core.errors import DataError, TelepathyError
from ..data import sidecar
from ..data.examples import ExampleStream
from ..data.exfile import Examples, is_examples_file
from ..data.stream import TokenStream, open_tokens
from ..plan.model import limits, model_shape
from ..plan.placement import Plan, plan, request_for
from ..slurm.env import DistEnv

log = logging.getLogger("telepathy.train.phases")


def check_inputs(cfg: Config, env: DistEnv) -> dict | None:
    """Everything that can be checked before any distributed or GPU work; what the run's data
    files hold, recorded in every checkpoint: the data file's sidecar (a file of examples
    without one: its own header), with the eval file's under `eval` (None: synthetic data, or
    a token file prepared elsewhere, and no eval.path)."""
    if cfg.model.pretrained_path and not (Path(cfg.model.pretrained_path) / "config.json").is_file():
        raise TelepathyError(f"model.pretrained_path={cfg.model.pretrained_path!r} has no "
                             "config.json; point it at a local Hugging Face model directory")
    vocab, positions = limits(cfg)
    if cfg.model.pretrained_path and positions is not None and cfg.data.seq_len > positions:
        raise TelepathyError(f"data.seq_len={cfg.data.seq_len} is longer than the {positions} "
                             f"positions of model.pretrained_path={cfg.model.pretrained_path!r} "
                             f"(its config.json); set data.seq_len to at most {positions}")
    meta = None
    if cfg.model.module is not None:
        check_module(cfg)
    if cfg.data.path is not None:
        check_readable(cfg.data.path, cfg.data.dtype, "data.path")
        meta = file_meta(cfg.data.path)
        if meta is not None:
            sidecar.check(cfg, meta, vocab if cfg.model.pretrained_path else None)
    if cfg.eval.path is not None:
        held_out = check_eval_file(cfg, vocab, meta)
        meta = {**(meta or {}), "eval": {"path": cfg.eval.path,
                                         "sha256": held_out.get("sha256")}}
    make_plan(cfg, env.world_size, gpu_mem_gib=None)
    check_trackers(cfg)
    return meta


def check_module(cfg: Config) -> None:
    """model.module builds on the meta device (or says why it cannot there), data.module's
    samples are dicts of tensors of one shape, and the module's forward takes a batch of them
    and returns a loss (where it runs on the meta device); the bases exist."""
    import torch

    from ..engine.usercode import build_on_meta, check_forward
    from .steps import causal_labels, tensors

    for base in cfg.model.base_paths or ():
        if not Path(base).exists():
            raise DataError(f"model.base_paths: {base!r} does not exist; list the directories "
                            "model.module's frozen weights are read from")
    built = build_on_meta(cfg)
    if built.module is None:
        return
    if cfg.data.module is not None:
        stream = data_module_stream(cfg)
        stream.check()
        batch = stream.inputs(stream.sample_ids(0, min(2, stream.num_samples)))
    else:
        vocab = limits(cfg)[0]
        stream = open_stream(cfg, cfg.data.path, vocab, None) if cfg.data.path else None
        if stream is None:
            return
        batch = stream.inputs(stream.sample_ids(0, 1))
        batch["labels"] = causal_labels(batch["labels"])
    check_forward(built.module, tensors(batch, torch.device("cpu")), cfg.model.module)


def data_module_stream(cfg: Config):
    from ..data.userdata import DatasetStream
    from ..engine.usercode import build_dataset

    return DatasetStream(build_dataset(cfg), cfg.data.module, cfg.data.seed)


def file_meta(path: str) -> dict | None:
    """A prepared file's sidecar; for a file of examples without one (a prepare cut off between
    the file and its sidecar), the same description from its own header."""
    meta = sidecar.read(path)
    if meta is None and is_examples_file(path):
        meta = Examples(path).meta
    return meta


def check_readable(path: str, dtype: str, key: str) -> None:
    """A token file maps as `dtype` tokens; a file of examples opens (its offsets agree)."""
    if key != "data.path" and not Path(path).is_file():
        raise DataError(f"{key}={path!r} does not exist; prepare it with telepathy data prepare")
    if is_examples_file(path):
        Examples(path)
    else:
        open_tokens(path, dtype)


def check_eval_file(cfg: Config, vocab: int, train: dict | None) -> dict:
    """eval.path opens, its tokens fit the model's vocabulary and come from the training data's
    tokenizer (their sidecars say), and some of its tokens count in a loss; its description."""
    check_readable(cfg.eval.path, cfg.data.dtype, "eval.path")
    meta = file_meta(cfg.eval.path) or {}
    if meta.get("loss_tokens") == 0:
        raise DataError(f"eval.path={cfg.eval.path!r}: no token of it counts in the loss (its "
                        "sidecar says loss_tokens 0); prepare held-out examples with answers")
    if meta.get("vocab_size", 0) > vocab:
        raise DataError(f"eval.path={cfg.eval.path!r} was tokenized with {meta.get('tokenizer')!r}"
                        f", a vocabulary of {meta['vocab_size']} tokens, more than the model's "
                        f"{vocab}; prepare it with the training data's tokenizer")
    if train and meta and train.get("tokenizer_sha256") != meta.get("tokenizer_sha256"):
        raise DataError(f"eval.path={cfg.eval.path!r} and data.path={cfg.data.path!r} were "
                        "prepared with different tokenizers (their sidecars' tokenizer_sha256 "
                        "differ); prepare both with the same one")
    return meta


TRACKER_MODULES = {"tensorboard": ("tensorboard",), "wandb": ("wandb",),
                   "mlflow": ("mlflow", "sqlalchemy", "alembic")}
"""What each tracker of `track:` imports in the relay (MLflow's SQLite store needs the last
two); `pip install 'telepathy[<tracker>]'` installs them."""


WANDB_AT_LEAST = (0, 28)


def _version(package: str) -> tuple[int, ...]:
    import importlib.metadata
    import re

    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return (0,)
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules: blocked
        return False


def check_trackers(cfg: Config) -> None:
    """An enabled tracker whose package is missing is refused before any distributed work."""
    for name in cfg.track.trackers:
        missing = [m for m in TRACKER_MODULES[name] if not _installed(m)]
        if name == "wandb" and not missing and _version("wandb") < WANDB_AT_LEAST:
            raise TelepathyError(
                f"track.wandb.mode={cfg.track.wandb.mode} needs wandb >= "
                f"{'.'.join(map(str, WANDB_AT_LEAST))} (its `wandb leet inspect` reads the offline "
                f"runs back); {sys.executable} has {'.'.join(map(str, _version('wandb')))}: pip "
                "install -U 'telepathy[wandb]'")
        if missing:
            key = {"tensorboard": "track.tensorboard=true", "wandb": f"track.wandb.mode="
                   f"{cfg.track.wandb.mode}", "mlflow": "track.mlflow.enabled=true"}[name]
            raise TelepathyError(
                f"{key} needs the Python package(s) {', '.join(missing)}, which are not installed "
                f"in {sys.executable}: pip install 'telepathy[{name}]' (exact versions: "
                f"requirements.lock), or turn the tracker off")


def make_plan(cfg: Config, world_size: int, gpu_mem_gib: float | None,
              max_micro: int | None = None, run_dir: Path | None = None) -> Plan:
    """The placement of this run on `world_size` ranks (memory unchecked when None), its
    micro-batch at most `max_micro` (carried after an out-of-memory error); `run_dir`: where a
    model.module's measured counts may be recorded."""
    shape = model_shape(cfg, count=gpu_mem_gib is not None, run_dir=run_dir)
    request = request_for(cfg, world_size, gpu_mem_gib, shape)
    return plan(dataclasses.replace(request, max_micro=max_micro) if max_micro else request)


def open_stream(cfg: Config, path: str | Path, vocab: int, meta: dict | None,
                evaluation: bool = False) -> Any:
    """A token file read in windows, or a file of examples read in rows; for an evaluation
    in file order, its first eval.max_examples."""
    limit = cfg.eval.max_examples if evaluation else 0
    if is_examples_file(path):
        pad = (meta or {}).get("pad_token_id")
        stream = ExampleStream(Examples(path), cfg.data.seq_len, cfg.data.seed, vocab,
                               cfg.data.packing, 0 if pad is None else int(pad),
                               shuffle=not evaluation, limit=limit)
        if stream.truncated:
            lost = int(stream.examples.loss_tokens[:stream.num_examples].sum() - stream.counts.sum())
            log.warning("%s: %d of %d examples are longer than data.seq_len=%d and are cut to it "
                        "(%d of their loss tokens lost); prepare with --max-len %d to see which",
                        path, stream.truncated, stream.num_examples, cfg.data.seq_len, lost,
                        cfg.data.seq_len)
        if not stream.counts.any():
            raise DataError(f"{path}: no token of its examples counts in the loss within "
                            f"data.seq_len={cfg.data.seq_len}; raise data.seq_len or prepare "
                            "examples whose answers fit")
        return stream
    return TokenStream(open_tokens(path, cfg.data.dtype), cfg.data.seq_len, cfg.data.seed, vocab,
                       shuffle=not evaluation, limit=limit)
