"""What the trainer needs from its collaborators, as small Protocols.

The real ones are the process group (`engine.distributed.Dist`), the checkpoint manager
(`checkpoint.manager.CheckpointManager`), the DeepSpeed engine behind `steps.EngineSteps`, the
token stream (`data.TokenStream`) and the preemption flag (`signals.PreemptionFlag`); unit tests
pass fakes of the same shape to check the save, preemption and out-of-memory logic in
milliseconds (tests/unit/test_trainer.py), beside the real-process tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..core.events import SaveResult
from ..plan.placement import Layout


class Collective(Protocol):
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def any(self, flags: Sequence[bool]) -> list[bool]: ...

    def barrier(self) -> None: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...


class Checkpoints(Protocol):
    @property
    def expected_seconds(self) -> float | None: ...

    def space(self) -> tuple[bool, int, int]: ...

    def save(self, engine: Any, step: int, state: dict[str, Any], reason: str = "",
             wait: bool = False) -> float: ...

    def wait(self) -> SaveResult | None: ...

    def completed(self) -> list[SaveResult]: ...

    def newest_complete_step(self) -> int: ...

    def record_best(self, best: dict[str, Any]) -> None: ...


class Steps(Protocol):
    """Runs optimizer steps on the model."""

    engine: Any
    """What checkpoints save (the DeepSpeed engine)."""
    last_tokens: int | None
    """Tokens of the last step's global batch that are not padding (None: every token)."""

    def run(self, step: int, samples_seen: int, layout: Layout) -> tuple[float, float]:
        """Optimizer step `step` (0-based) on the samples from `samples_seen` on: (global mean
        loss, lr). May raise torch.OutOfMemoryError."""
        ...

    def counters(self) -> Any:
        """What to rewind to if the step must be retried."""
        ...

    def drop_partial_step(self, counters: Any, layout: Layout) -> None:
        """Forget a step that failed part-way; the next try uses `layout`."""
        ...

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last step (None: not computed)."""
        ...

    def memory_peak_gb(self) -> float | None: ...


class DataPosition(Protocol):
    def position(self, sample_index: int) -> Any:
        """(epoch, offset) of a stream position."""
        ...


class Flag(Protocol):
    @property
    def is_set(self) -> bool: ...

    @property
    def name(self) -> str | None: ...

    received_at: float | None


class Progress(Protocol):
    """The hang watchdog (`watchdog.Watchdog`) as the trainer sees it."""

    def expect(self, where: str, allowance_s: float | None = None) -> None: ...

    def progress(self, step: int | None = None) -> None: ...


class NoWatchdog:
    """No hang detection (unit tests, tools that drive the trainer by hand)."""

    def expect(self, where: str, allowance_s: float | None = None) -> None:
        pass

    def progress(self, step: int | None = None) -> None:
        pass
