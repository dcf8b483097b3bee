"""A deterministic, resumable stream of packed rows of examples (instruction tuning).

The examples of a prepared file (`exfile`) are visited, epoch after epoch, in a permutation
seeded by (data.seed, epoch), and packed into rows of `seq_len` tokens: best fit, in that order,
each example into the row with the least room that holds it (a row is opened when none does).
With `packing` off each example is a row of its own, padded. An example longer than `seq_len`
is cut to it. The rows of an epoch are a pure function of the seed, the epoch, the examples'
lengths and `seq_len`; the stream position of a row is its index in the endless sequence of
rows, epoch after epoch. So optimizer step `s` trains rows `s * global_batch ...` at any world
size, after any resume, and a resume finds its rows from the examples' lengths alone (the
offsets), without reading a token before them; no example at a row's edge is dropped or
repeated, since rows, not tokens, are the unit of position.

In a row, position ids restart at 0 with each example (transformers then keeps the examples
from attending to one another: a block-diagonal causal mask, or variable-length attention with
FlashAttention), and the padding at its end is one more block whose labels are all ignored.
The labels of an example are its next tokens where the loss mask counts them, else IGNORE;
the last token of an example predicts nothing.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from ..core.errors import DataError
from .exfile import Examples
from .stream import DataPosition

IGNORE = -100
"""The label of a position that does not count in the loss (PyTorch's ignore_index)."""


@dataclass(frozen=True)
class Rows:
    """One epoch's rows: row r holds examples `members[starts[r]:starts[r + 1]]`."""

    members: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return int(self.starts.size - 1)

    def row(self, r: int) -> np.ndarray:
        return self.members[self.starts[r]:self.starts[r + 1]]


def best_fit(order: np.ndarray, lengths: np.ndarray, capacity: int) -> Rows:
    """Pack the examples of `order` (in that order) into rows of `capacity` tokens: each into
    the row with the least room that still holds it, a new row when none does. Rows are
    numbered as they are opened, examples within a row kept in the order they came."""
    room: list[tuple[int, int]] = []  # (tokens left, row), sorted
    rows: list[list[int]] = []
    for example in order.tolist():
        need = int(lengths[example])
        i = bisect.bisect_left(room, (need, -1))
        if i < len(room):
            left, r = room.pop(i)
        else:
            left, r = capacity, len(rows)
            rows.append([])
        rows[r].append(example)
        if left - need > 0:
            bisect.insort(room, (left - need, r))
    starts = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=starts[1:])
    members = np.fromiter((e for r in rows for e in r), dtype=np.int64, count=int(starts[-1]))
    return Rows(members, starts)


def one_per_row(order: np.ndarray) -> Rows:
    return Rows(order.astype(np.int64), np.arange(order.size + 1, dtype=np.int64))


def loss_counts(examples: Examples, lengths: np.ndarray) -> np.ndarray:
    """Per example, the tokens that count in the loss among its first `lengths` tokens (the
    first never counts: nothing predicts it): the file's own count, counted again from the mask
    only for an example cut shorter."""
    out = np.array(examples.loss_tokens[:lengths.size], dtype=np.int64)
    for i in np.flatnonzero(lengths < examples.lengths[:lengths.size]).tolist():
        start = int(examples.offsets[i])
        out[i] = int(np.count_nonzero(examples.loss_mask[start + 1:start + int(lengths[i])]))
    return out


class ExampleStream:
    """Rows of packed examples, as the trainer reads them (see the module's docstring).

    `shuffle` off visits the examples in file order (an evaluation); `limit` > 0 keeps the
    first `limit` examples only."""

    def __init__(self, examples: Examples, seq_len: int, seed: int, vocab_size: int,
                 packing: bool = True, pad_id: int = 0, shuffle: bool = True, limit: int = 0):
        n = len(examples) if limit <= 0 else min(limit, len(examples))
        if n < 1:
            raise DataError(f"{examples.path} holds no examples; prepare it again from data "
                            "with at least one example")
        self.examples = examples
        self.seq_len = seq_len
        self.seed = seed
        self.vocab_size = vocab_size
        self.packing = packing
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.lengths = np.minimum(examples.lengths[:n], seq_len)
        self.truncated = int(np.count_nonzero(examples.lengths[:n] > seq_len))
        self.counts = loss_counts(examples, self.lengths)
        self._epochs: dict[int, Rows] = {}
        self._ends: list[int] = []
        """Stream position after each epoch so far (cumulative row counts)."""

    @property
    def num_examples(self) -> int:
        return int(self.lengths.size)

    def rows_of(self, epoch: int) -> Rows:
        rows = self._epochs.get(epoch)
        if rows is None:
            order = (np.random.Generator(np.random.PCG64([self.seed, epoch]))
                     .permutation(self.num_examples) if self.shuffle
                     else np.arange(self.num_examples))
            rows = best_fit(order, self.lengths, self.seq_len) if self.packing \
                else one_per_row(order)
            if len(self._epochs) > 2:  # the epoch before the last is not read again
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = rows
        return rows

    def position(self, sample_index: int) -> DataPosition:
        """(epoch, row within it) of a stream position."""
        while not self._ends or self._ends[-1] <= sample_index:
            self._ends.append((self._ends[-1] if self._ends else 0)
                              + len(self.rows_of(len(self._ends))))
        epoch = bisect.bisect_right(self._ends, sample_index)
        return DataPosition(epoch, sample_index - (self._ends[epoch - 1] if epoch else 0))

    @property
    def rows_per_epoch(self) -> int:
        """Rows of the first epoch (of an unshuffled stream: of every epoch)."""
        return len(self.rows_of(0))

    def sample_ids(self, start: int, count: int) -> np.ndarray:
        """Rows are named by their stream position."""
        return np.arange(start, start + count, dtype=np.int64)

    def members(self, sample_id: int) -> np.ndarray:
        pos = self.position(int(sample_id))
        return self.rows_of(pos.epoch).row(pos.offset)

    def loss_tokens(self, sample_ids: np.ndarray) -> int:
        return int(sum(int(self.counts[self.members(s)].sum()) for s in sample_ids))

    def real_tokens(self, sample_ids: np.ndarray) -> int:
        return int(sum(int(self.lengths[self.members(s)].sum()) for s in sample_ids))

    def inputs(self, sample_ids: np.ndarray) -> dict[str, np.ndarray]:
        """input_ids, labels and position_ids, each (len(sample_ids), seq_len) int64."""
        shape = (len(sample_ids), self.seq_len)
        ids = np.full(shape, self.pad_id, dtype=np.int64)
        labels = np.full(shape, IGNORE, dtype=np.int64)
        positions = np.zeros(shape, dtype=np.int64)
        for b, sample in enumerate(sample_ids):
            at = 0
            for example in self.members(sample).tolist():
                n = int(self.lengths[example])
                tokens = self.examples.tokens(example)[:n].astype(np.int64)
                mask = self.examples.mask(example)[:n]
                ids[b, at:at + n] = tokens
                labels[b, at:at + n - 1] = np.where(mask[1:] > 0, tokens[1:], IGNORE)
                positions[b, at:at + n] = np.arange(n)
                at += n
            positions[b, at:] = np.arange(self.seq_len - at)
        if ids.size and ids.max() >= self.vocab_size:
            raise DataError(f"token id {int(ids.max())} in {self.examples.path} is >= the model's "
                            f"vocabulary of {self.vocab_size}; prepare the data with the "
                            "model's own tokenizer")
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
