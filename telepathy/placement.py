"""Placement: how the fixed global batch is split over ranks. Pure arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """How the global batch is split: world * micro * accum == global_batch."""

    world_size: int
    micro_batch: int
    accum: int


def choose_layout(global_batch: int, world_size: int, micro_sizes: list[int]) -> Layout:
    if global_batch % world_size:
        divisors = [n for n in range(1, 5) if global_batch % n == 0]
        raise ConfigError(f"train.global_batch={global_batch} does not divide over {world_size} "
                          f"ranks; it divides over {divisors} ranks. Pick a global batch divisible "
                          f"by {world_size} (e.g. {global_batch - global_batch % world_size or world_size})")
    per_rank = global_batch // world_size
    for micro in sorted(micro_sizes, reverse=True):
        if per_rank % micro == 0:
            return Layout(world_size, micro, per_rank // micro)
    raise ConfigError(f"no size in placement.micro_batch_sizes={micro_sizes} divides the per-rank "
                      f"batch {per_rank} (= train.global_batch / {world_size} ranks); add 1 to the list")
