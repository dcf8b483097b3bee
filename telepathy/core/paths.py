"""RunPaths: the one place that names every file of a run directory. Pure.

What makes a checkpoint directory complete is `telepathy.checkpoint.manifest`'s to say.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> RunPaths:
        return cls(Path(root).absolute())

    @property
    def config(self) -> Path:
        """The effective configuration of the run, as first started."""
        return self.root / "config.yaml"

    @property
    def submitted_config(self) -> Path:
        """The config `telepathy plan --submit` planned with (its --set overrides applied): the
        submitted job reads this one, so it runs what was planned."""
        return self.root / "submitted-config.yaml"

    @property
    def tokenizer(self) -> Path:
        """A copy of the tokenizer the run's data was prepared with (telepathy data prepare)."""
        return self.root / "tokenizer"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        """checkpoint.keep_best: {"step", "eval_loss"} of the best checkpoint, written once that
        checkpoint is durable (checked against the checkpoints before it is believed)."""
        return self.checkpoints / "best.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def system(self, host: str) -> Path:
        """GPU and host samples of one node."""
        return self.root / f"system-{host}.jsonl"

    def heartbeat(self, host: str) -> Path:
        """One node's heartbeat on a job of several nodes (JSON, replaced every few seconds)."""
        return self.heartbeats / f"{host}.json"

    @property
    def heartbeats(self) -> Path:
        return self.root / "heartbeats"

    @property
    def plan_carry(self) -> Path:
        """The smaller micro-batches ranks that ran out of memory chose, each from the step where
        it struck, for the allocations after them (JSON); delete it to plan afresh."""
        return self.root / "plan-carry.json"

    @property
    def base_model(self) -> Path:
        """Checksums of the files of model.pretrained_path, recorded at the run's first start
        (JSON): a fine-tuning run's checkpoints leave its frozen base out."""
        return self.root / "base-model.json"

    @property
    def module_shape(self) -> Path:
        """model.module's parameters as counted at a start (JSON: parameters, trainable), for
        the planner where the module cannot be built on the meta device."""
        return self.root / "module-shape.json"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    @property
    def universal_root(self) -> Path:
        """Checkpoints converted to DeepSpeed's universal format (for a new world size)."""
        return self.root / "universal"

    def universal(self, step: int) -> Path:
        return self.universal_root / checkpoint_name(step)

    def synthetic_corpus(self, tokens: int, vocab: int, seed: int) -> Path:
        return self.data / f"synthetic-v{vocab}-n{tokens}-s{seed}.npy"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint directory name, or None for anything else."""
    match = CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None
