"""Rows of packed examples (instruction tuning): the file of examples read back, the best-fit
packing, the stream position across epochs and after a seek, the labels of the loss mask, and
the best checkpoint kept by pruning."""

import json

import numpy as np
import pytest

from telepathy.checkpoint import directory
from telepathy.checkpoint.manifest import MANIFEST, STATE, seal
from telepathy.core.errors import DataError
from telepathy.core.paths import RunPaths
from telepathy.data.examples import IGNORE, ExampleStream, best_fit
from telepathy.data.exfile import Examples, ExamplesWriter, is_examples_file


def write_examples(path, lengths, seed=0, vocab=100):
    rng = np.random.default_rng(seed)
    with ExamplesWriter(path, "uint16") as w:
        for n in lengths:
            ids = rng.integers(1, vocab, size=n)
            mask = (np.arange(n) >= n // 2).astype(np.uint8)  # the second half is the answer
            w.add(ids, mask)
        return w.finish({"example_format": "chat"})


@pytest.fixture
def examples(tmp_path):
    rng = np.random.default_rng(3)
    lengths = np.minimum(2 + rng.exponential(10, size=300).astype(int), 32).tolist()
    lengths[5] = 70  # longer than a row: cut
    write_examples(tmp_path / "train.ex", lengths)
    return Examples(tmp_path / "train.ex")


def test_the_file_reads_back_with_safetensors_and_its_own_reader(tmp_path):
    from safetensors.numpy import load_file

    meta = write_examples(tmp_path / "x.ex", [3, 5])
    arrays = load_file(str(tmp_path / "x.ex"))
    assert arrays["offsets"].tolist() == [0, 3, 8]
    assert arrays["loss_mask"].tolist() == [0, 1, 1, 0, 0, 1, 1, 1]
    assert arrays["loss_tokens"].tolist() == [2, 3]
    assert meta["loss_tokens"] == 5 and meta["examples"] == 2 and meta["tokens"] == 8
    ex = Examples(tmp_path / "x.ex")
    assert ex.tokens(1).tolist() == arrays["input_ids"][3:].tolist()
    assert is_examples_file(tmp_path / "x.ex")
    (tmp_path / "raw.bin").write_bytes(np.arange(64, dtype=np.uint16).tobytes())
    assert not is_examples_file(tmp_path / "raw.bin")
    with pytest.raises(DataError, match="not a prepared examples file"):
        Examples(tmp_path / "raw.bin")


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError), ExamplesWriter(tmp_path / "x.ex", "uint16") as w:
        w.add([1, 2], [0, 1])
        w.add([1, 2], [0])
    assert list(tmp_path.iterdir()) == []


def test_best_fit_puts_every_example_in_one_row_that_holds_it():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 33, size=500)
    rows = best_fit(rng.permutation(500), lengths, 32)
    assert sorted(rows.members.tolist()) == list(range(500))
    assert all(lengths[rows.row(r)].sum() <= 32 for r in range(len(rows)))
    fill = lengths.sum() / (32 * len(rows))
    assert fill > 0.9, fill  # next-fit on these lengths fills about 0.7


def test_rows_are_the_same_whether_read_in_order_or_after_a_seek(examples):
    a = ExampleStream(examples, 32, seed=5, vocab_size=100)
    b = ExampleStream(examples, 32, seed=5, vocab_size=100)
    epoch0 = a.rows_per_epoch
    far = 3 * epoch0 + 7
    in_order = [a.members(i).tolist() for i in range(far + 5)]
    assert [b.members(i).tolist() for i in range(far, far + 5)] == in_order[far:]
    assert b.position(far).epoch == 3
    # every epoch visits every example exactly once, each epoch in another order
    for epoch in range(3):
        assert sorted(a.rows_of(epoch).members.tolist()) == list(range(len(examples)))
    assert a.rows_of(0).members.tolist() != a.rows_of(1).members.tolist()


def test_labels_count_the_answers_only_and_positions_restart(examples):
    s = ExampleStream(examples, 32, seed=5, vocab_size=100)
    batch = s.inputs(s.sample_ids(0, 4))
    assert {k: v.shape for k, v in batch.items()} == {k: (4, 32) for k in batch}
    for b, row in enumerate(range(4)):
        at = 0
        for e in s.members(row).tolist():
            n = int(s.lengths[e])
            tokens, mask = examples.tokens(e)[:n], examples.mask(e)[:n]
            assert batch["position_ids"][b, at:at + n].tolist() == list(range(n))
            want = [int(t) if m else IGNORE for t, m in zip(tokens[1:], mask[1:])] + [IGNORE]
            assert batch["labels"][b, at:at + n].tolist() == want
            at += n
        assert (batch["labels"][b, at:] == IGNORE).all()
    counted = int((batch["labels"] != IGNORE).sum())
    assert s.loss_tokens(s.sample_ids(0, 4)) == counted


def test_a_long_example_is_cut_to_the_row_and_padding_gives_one_example_a_row(examples):
    s = ExampleStream(examples, 32, seed=5, vocab_size=100, packing=False)
    assert s.truncated == 1 and s.lengths[5] == 32
    assert s.counts[5] == np.count_nonzero(examples.mask(5)[1:32]) < examples.loss_tokens[5]
    assert (s.counts[:5] == examples.loss_tokens[:5]).all()
    assert s.rows_per_epoch == len(examples)
    assert all(len(s.members(i)) == 1 for i in range(10))
    ordered = ExampleStream(examples, 32, seed=5, vocab_size=100, shuffle=False, limit=7)
    assert ordered.rows_of(0).members.tolist() == ordered.rows_of(4).members.tolist()
    assert sorted(ordered.rows_of(0).members.tolist()) == list(range(7))


def test_a_token_beyond_the_vocabulary_is_refused(examples):
    s = ExampleStream(examples, 32, seed=5, vocab_size=10)
    with pytest.raises(DataError, match="vocabulary of 10"):
        s.inputs(s.sample_ids(0, 1))


def fake_checkpoint(paths, step, best):
    ckpt = paths.checkpoint(step)
    (ckpt / "telepathy").mkdir(parents=True)
    (ckpt / STATE).write_text(json.dumps({"step": step, "best": best}))
    manifest = seal({"format": "telepathy-checkpoint/3", "step": step, "files": {}})
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def test_pruning_keeps_the_best_beside_the_newest(tmp_path):
    paths = RunPaths.at(tmp_path)
    for step in (10, 20, 30, 40):
        fake_checkpoint(paths, step, {"step": 10, "eval_loss": 1.0})
    assert directory.best_step(paths) == 10
    assert directory.prune(paths, keep=2) == ["step_00000020"]
    assert directory.complete_steps(paths.checkpoints) == [10, 30, 40]
    fake_checkpoint(paths, 50, {"step": 50, "eval_loss": 0.5})  # a new best: the old one goes
    assert directory.prune(paths, keep=2) == ["step_00000010", "step_00000030"]
    assert directory.complete_steps(paths.checkpoints) == [40, 50]


def test_a_best_that_never_became_durable_or_an_unreadable_record_does_not_unprotect_the_best(
        tmp_path):
    paths = RunPaths.at(tmp_path)
    fake_checkpoint(paths, 10, {"step": 10, "eval_loss": 1.0})
    fake_checkpoint(paths, 20, {"step": 10, "eval_loss": 1.0})
    fake_checkpoint(paths, 40, {"step": 30, "eval_loss": 0.9})  # the save of 30 failed
    fake_checkpoint(paths, 50, {"step": 30, "eval_loss": 0.9})
    (paths.checkpoint(50) / STATE).write_text("{not json")  # a damaged record is passed over
    assert directory.best_step(paths) == 10
    assert directory.prune(paths, keep=2) == ["step_00000020"]
    directory.record_best(paths, {"step": 40, "eval_loss": 0.8})  # best.json comes first
    assert directory.best_step(paths) == 40
