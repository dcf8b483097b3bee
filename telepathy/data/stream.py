"""A deterministic, resumable token stream.

Samples are non-overlapping windows of `seq_len + 1` tokens of one token file. Every epoch
visits them in a permutation seeded by (data.seed, epoch). The samples of optimizer step `s`
are positions `s * global_batch ... (s + 1) * global_batch - 1` of that endless stream, so the
data position is a function of the step alone: a resume at any world size reads exactly the
samples an uninterrupted run would have read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import DataError


@dataclass(frozen=True)
class DataPosition:
    epoch: int
    offset: int
    """Index into the epoch's permutation of the next sample to read."""


def generate_corpus(tokens: int, vocab: int, seed: int) -> np.ndarray:
    """A synthetic corpus with learnable structure: Zipf-distributed 'words' of random tokens."""
    rng = np.random.Generator(np.random.PCG64(seed))
    n_words = max(16, vocab * 2)
    lengths = rng.integers(2, 9, size=n_words)
    words = [rng.integers(0, vocab, size=n).astype(np.uint32) for n in lengths]
    weights = 1.0 / np.arange(1, n_words + 1)
    picks = rng.choice(n_words, size=tokens // 2 + 16, p=weights / weights.sum())
    stream = np.concatenate([words[i] for i in picks])
    while stream.size < tokens:
        stream = np.concatenate([stream, stream])
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    return stream[:tokens].astype(dtype)


def write_corpus(path: Path, tokens: np.ndarray) -> None:
    """Write a token array as .npy atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, tokens)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_tokens(path: str | Path, dtype: str) -> np.ndarray:
    """Memory-map a token file: .npy carries its own dtype, anything else is raw `dtype`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; set data.path to a pre-tokenized "
                        ".npy/.bin file, or leave it empty with data.synthetic_tokens > 0")
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
    else:
        tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    if tokens.ndim != 1:
        raise DataError(f"data file {str(path)!r} has shape {tokens.shape}; expected a 1-D token array")
    return tokens


class Order:
    """The endless sequence of `num_samples` sample ids, epoch after epoch, each epoch in a
    permutation seeded by (seed, epoch); `shuffle` off: in index order (an evaluation)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def position(self, sample_index: int) -> DataPosition:
        return DataPosition(*divmod(sample_index, self.num_samples))

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm = rng.permutation(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def sample_ids(self, start: int, count: int) -> np.ndarray:
        """Sample ids at stream positions start .. start+count-1 (crossing epochs as needed)."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            pos = self.position(start + i)
            out[i] = self._permutation(pos.epoch)[pos.offset]
        return out

    @property
    def rows_per_epoch(self) -> int:
        return self.num_samples


class TokenStream(Order):
    """`shuffle` off reads the windows in file order (an evaluation); `limit` > 0 keeps the
    first `limit` windows only."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, vocab_size: int,
                 shuffle: bool = True, limit: int = 0):
        self.tokens = tokens
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        num_samples = (len(tokens) - 1) // seq_len
        if limit > 0:
            num_samples = min(num_samples, limit)
        if num_samples < 1:
            raise DataError(f"the data holds {len(tokens)} tokens, fewer than one sample of "
                            f"data.seq_len + 1 = {seq_len + 1}; use more data or a smaller seq_len")
        super().__init__(num_samples, seed, shuffle)

    def batch(self, sample_ids: np.ndarray) -> np.ndarray:
        """A (len(sample_ids), seq_len + 1) int64 array of tokens."""
        rows = [np.asarray(self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1])
                for i in sample_ids]
        batch = np.stack(rows).astype(np.int64)
        if batch.size and batch.max() >= self.vocab_size:
            raise DataError(f"token id {int(batch.max())} in the data is >= model.vocab_size="
                            f"{self.vocab_size}; tokenize with the model's vocabulary or raise "
                            "model.vocab_size")
        return batch

    def inputs(self, sample_ids: np.ndarray) -> dict[str, np.ndarray]:
        """input_ids and labels (the next tokens), each (len(sample_ids), seq_len) int64."""
        batch = self.batch(sample_ids)
        return {"input_ids": batch[:, :-1], "labels": batch[:, 1:]}

    def loss_tokens(self, sample_ids: np.ndarray) -> int:
        """Every token of a window counts."""
        return len(sample_ids) * self.seq_len

    real_tokens = loss_tokens


def rank_slice(step_ids: np.ndarray, micro_step: int, rank: int, world: int, micro: int) -> np.ndarray:
    """The sample ids one rank trains on in one micro-step of an optimizer step.

    The global batch is laid out as [accumulation][rank][micro], so the set of samples of a
    step does not depend on how it is split.
    """
    start = (micro_step * world + rank) * micro
    return step_ids[start:start + micro]
