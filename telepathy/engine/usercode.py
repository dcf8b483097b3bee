"""A model and a dataset of the user's own code (`model.module`, `data.module`): "PKG.MOD:FUNC"
references, imported with the config's `code_path` and the working directory on sys.path,
called as FUNC(options). Every failure is a ConfigError that names the key, the reference, the
last line of the traceback with the user's file and line, and what to do.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config
from ..core.errors import ConfigError


@contextmanager
def search_path(dirs: Sequence[str]):
    """`dirs`, then the working directory, first on sys.path while importing."""
    added = [d for d in [*dirs, os.getcwd()] if d not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for d in added:
            if d in sys.path:
                sys.path.remove(d)


def where(exc: BaseException) -> str:
    """The exception's last line, and the innermost frame it passed through."""
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{last} (at {frames[-1].filename}:{frames[-1].lineno})" if frames else last


def resolve(ref: str, key: str, code_path: Sequence[str] = ()) -> Callable[..., Any]:
    """The function `ref` names ("PKG.MOD:FUNC")."""
    mod_name, _, func_name = ref.partition(":")
    looked = ", ".join([*code_path, os.getcwd()])
    try:
        with search_path(code_path):
            module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and mod_name.split(".")[0] == exc.name.split(".")[0]:
            raise ConfigError(f"{key}={ref!r}: no module {mod_name!r} in {looked} or the "
                              "installed packages; put it beside the config file or in the "
                              "working directory, or fix the name") from None
        raise ConfigError(f"{key}={ref!r}: importing {mod_name} failed: {where(exc)}; install "
                          "what it imports") from None
    except Exception as exc:  # the user's module itself is broken
        raise ConfigError(f"{key}={ref!r}: importing {mod_name} failed: {where(exc)}; fix "
                          "that module") from None
    func: Any = module
    for part in func_name.split("."):
        func = getattr(func, part, None)
    if not callable(func):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"{key}={ref!r}: {mod_name} ({getattr(module, '__file__', '?')}) has "
                          f"no function {func_name}; it has {', '.join(names[:12]) or 'none'}")
    return func


def call(ref: str, key: str, options: Mapping[str, Any], code_path: Sequence[str]) -> Any:
    """FUNC(options), a failure reported with the user's file and line."""
    func = resolve(ref, key, code_path)
    try:
        with search_path(code_path):  # for what FUNC imports itself
            return func(dict(options))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{key}={ref!r}: {ref.partition(':')[2]}({key.split('.')[0]}.options) "
                          f"raised {where(exc)}; fix the function or its options") from None


def build_module(cfg: Config) -> torch.nn.Module:
    """model.module's FUNC(model.options), seeded with train.seed: every rank and every start
    builds the same module."""
    torch.manual_seed(cfg.train.seed)
    module = call(cfg.model.module, "model.module", cfg.model.options, cfg.code_path)
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"model.module={cfg.model.module!r} returned {type(module).__name__}, "
                          "not a torch.nn.Module; return the model itself")
    if not any(True for _ in module.parameters()):
        raise ConfigError(f"model.module={cfg.model.module!r} built a module without "
                          "parameters; nothing would train")
    scalars = [n for n, p in module.named_parameters() if p.dim() == 0]
    if scalars:
        raise ConfigError(f"model.module={cfg.model.module!r}: parameter {scalars[0]} is a "
                          "0-dimensional tensor, which DeepSpeed ZeRO-3 cannot partition; make "
                          "it of shape (1,) (nn.Parameter(torch.ones(1)))")
    return module


def build_dataset(cfg: Config) -> Any:
    """data.module's FUNC(data.options): a map-style dataset of at least one sample."""
    dataset = call(cfg.data.module, "data.module", cfg.data.options, cfg.code_path)
    missing = [m for m in ("__len__", "__getitem__") if not hasattr(dataset, m)]
    if missing:
        raise ConfigError(f"data.module={cfg.data.module!r} returned {type(dataset).__name__}, "
                          f"which has no {' or '.join(missing)}; return a map-style dataset "
                          "(torch.utils.data.Dataset with __len__ and __getitem__)")
    if len(dataset) < 1:
        raise ConfigError(f"data.module={cfg.data.module!r}: the dataset is empty; check "
                          "data.options")
    return dataset


def loss_of(output: Any, ref: str) -> torch.Tensor:
    """The scalar loss of a forward's output: the tensor itself, or its `.loss` (`["loss"]`)."""
    loss = output
    if not isinstance(output, torch.Tensor):
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        what = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                else type(output).__name__ + ("" if loss is output else " without a loss"))
        raise ConfigError(f"model.module={ref!r}: its forward returned {what}; it must return "
                          "the loss: a scalar float tensor, or an object with .loss (pass labels "
                          "to a Hugging Face model, or reduce the loss with .mean())")
    return loss.reshape(())



def on_meta_error(exc: BaseException) -> bool:
    """Whether a failure came from building or running on the meta device (no weights there:
    `from_pretrained` refuses it, `.item()` has no value), not from the user's code itself."""
    text = str(exc).lower()
    return "meta" in text


@dataclass(frozen=True)
class MetaModule:
    """model.module built on the meta device (no weights read): its parameter counts, or why
    it could not be built there (`meta_error`: then counted when the job starts)."""

    module: torch.nn.Module | None
    total: int | None
    trainable: int | None
    meta_error: str | None = None


def build_on_meta(cfg: Config) -> MetaModule:
    """model.module's FUNC on the meta device, frozen as configured: a FUNC that fails there
    for a reason of its own (not of the meta device) is a ConfigError, as at the real build."""
    from . import finetune

    try:
        with torch.device("meta"):
            module = build_module(cfg)
    except ConfigError as exc:
        if not on_meta_error(exc):
            raise
        return MetaModule(None, None, None, str(exc))
    finetune.freeze(module, cfg.model.trainable, lora=False)
    finetune.check_trains(module, f"model.module={cfg.model.module!r}")
    params = {id(p): p for p in module.parameters()}.values()
    return MetaModule(module, sum(p.numel() for p in params),
                      sum(p.numel() for p in params if p.requires_grad))


def check_forward(module: torch.nn.Module, batch: Mapping[str, Any], ref: str) -> bool:
    """Run the meta module's forward on a meta copy of `batch`: a forward that returns no loss
    is a ConfigError now, before any distributed work. False where the forward cannot run on
    the meta device (control flow on values): the first step checks it instead."""
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    try:
        with torch.no_grad():
            output = module(**meta)
    except TypeError as exc:  # the batch's keys do not fit forward's arguments
        if on_meta_error(exc):
            return False
        raise ConfigError(f"model.module={ref!r}: its forward does not take the batch: "
                          f"{where(exc)}; it is called as forward(**batch) with the keys "
                          f"{', '.join(batch)} (add **kwargs for those it ignores)") from None
    except Exception:  # anything else may be the meta device's: the first step tells
        return False
    loss_of(output, ref)
    return True
