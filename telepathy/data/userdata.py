"""A map-style dataset of the user's own code (`data.module`) in telepathy's order.

The user's dataset says what sample `i` is; telepathy says which `i` comes when: the same
endless sequence of seeded per-epoch permutations as a token file's windows (stream.Order), so
optimizer step `s` trains samples `s * global_batch ...` of it at any world size and after any
resume, and the user's code never sees a rank, a step or a resume. Every sample is a dict of
tensors whose keys and shapes are those of sample 0: a batch stacks them (or the dataset's own
`collate` does), and a sample that differs is refused with its index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..core.errors import DataError
from .stream import Order

CHECKED_SAMPLES = 8
"""Samples read before any distributed work to check their keys and shapes: the first, the
last and six more at seeded places."""


def describe(item: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype)} of a sample."""
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in item.items()}


class DatasetStream(Order):
    def __init__(self, dataset: Any, ref: str, seed: int, shuffle: bool = True):
        self.dataset = dataset
        self.ref = ref
        super().__init__(len(dataset), seed, shuffle)
        self.expected = describe(self.sample(0))
        self.collate = getattr(dataset, "collate", None)

    def sample(self, i: int) -> Mapping[str, torch.Tensor]:
        """Sample `i`, checked: a dict of tensors shaped as sample 0 (once that is known)."""
        item = self.dataset[i]
        if not isinstance(item, Mapping) or not item or \
                not all(isinstance(v, torch.Tensor) for v in item.values()):
            what = type(item).__name__ + (" with values that are not all tensors"
                                          if isinstance(item, Mapping) else "")
            raise DataError(f"data.module={self.ref!r}: sample {i} is {what}; "
                            "__getitem__ must return a dict of tensors "
                            "(e.g. {'input_ids': tensor, 'labels': tensor})")
        expected = getattr(self, "expected", None)
        if expected is not None and describe(item) != expected:
            got = describe(item)
            diff = [f"{k}: {got.get(k, 'missing')} (sample 0: {expected.get(k, 'absent')})"
                    for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k)]
            raise DataError(f"data.module={self.ref!r}: sample {i} differs from sample 0 in "
                            f"{'; '.join(diff)}; every sample must have the same keys and shapes "
                            "(pad or cut them to a fixed length in __getitem__)")
        return item

    def check(self, count: int = CHECKED_SAMPLES) -> None:
        """Read up to `count` samples (the first, the last, others at seeded places)."""
        rng = np.random.Generator(np.random.PCG64(self.seed))
        picks = {0, self.num_samples - 1, *rng.integers(0, self.num_samples, size=count).tolist()}
        for i in sorted(picks)[:count]:
            self.sample(int(i))

    def inputs(self, sample_ids: np.ndarray) -> dict[str, Any]:
        """The batch of these samples: the dataset's collate, else each key stacked."""
        items = [self.sample(int(i)) for i in sample_ids]
        if self.collate is not None:
            return self.collate(items)
        return {k: torch.stack([item[k] for item in items]) for k in self.expected}

    def loss_tokens(self, sample_ids: np.ndarray) -> int:
        """A module's loss is a mean: each sample weighs the same."""
        return len(sample_ids)

    def real_tokens(self, sample_ids: np.ndarray) -> int | None:
        """Tokens, where the samples say: the elements of their `input_ids` (else None)."""
        shape = self.expected.get("input_ids", (None,))[0]
        return None if shape is None else len(sample_ids) * int(np.prod(shape))
