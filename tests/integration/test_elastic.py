"""Resume on another GPU count, and out-of-memory recovery: real DeepSpeed ZeRO-3 on CPU (gloo)."""

import shutil

import pytest

from telepathy.checkpoint.manager import CheckpointManager
from telepathy.checkpoint.manifest import MANIFEST
from telepathy.checkpoint.universal import universal_checkpoint
from telepathy.config import load_config
from telepathy.core.errors import CheckpointError
from telepathy.core.paths import RunPaths
from telepathy.engine.schedule import lr_factor
from tests import support
from tests.support import RNG, assert_close_losses, assert_same_state


def test_world_size_1_to_2_to_1_resumes_with_the_same_state_and_losses(tmp_path, reference):
    """Preempted at world 1, resumed and preempted at world 2, finished at world 1."""
    ref = reference(1)
    run_dir, dumps = tmp_path / "run", tmp_path / "dumps"
    env = {"TELEPATHY_DUMP_STATE": str(dumps)}
    rc, _ = support.interrupt(run_dir, RNG.randint(21, 30), world=1, env=env)
    assert rc == 75, support.log_text(run_dir)
    first = support.events(run_dir, "preempted")[-1]["step"]
    support.interrupt(run_dir, first + RNG.randint(3, 12), world=2, env=env)
    second = support.events(run_dir, "preempted")[-1]["step"]
    assert second > first
    assert support.run(run_dir, world=1, env=env) == 0, support.log_text(run_dir)

    changes = support.events(run_dir, "world_size_changed")
    assert [(e["from_world_size"], e["to_world_size"], e["step"], e["cached"]) for e in changes] \
        == [(1, 2, first, False), (2, 1, second, False)]
    assert_same_state(dumps / f"saved-step{first}-w1.safetensors",
                      dumps / f"loaded-step{first}-w2.safetensors")
    assert_same_state(dumps / f"saved-step{second}-w2.safetensors",
                      dumps / f"loaded-step{second}-w1.safetensors")
    assert_close_losses(support.losses(run_dir), ref, exact_until=first)
    rows = support.metrics(run_dir)
    assert {r["world_size"] for r in rows if first < r["step"] <= second} == {2}
    assert {r["world_size"] for r in rows if r["step"] > second} == {1}
    # The LR schedule went on where it stopped: every step used the uninterrupted run's lr.
    train = load_config(support.CONFIG, support.SETS).train
    wrong = [r["step"] for r in rows
             if r["lr"] != pytest.approx(train.lr * lr_factor(r["step"] - 1, train), rel=1e-9)]
    assert not wrong, f"lr off schedule at steps {wrong[:5]}"


def test_universal_copies_are_cached_verified_and_rebuilt(preempted_run, copy_of, process_group):
    run_dir = copy_of(preempted_run)
    paths = RunPaths.at(run_dir)
    manager = CheckpointManager(paths, process_group, keep=3)
    found, _ = manager.newest_valid()
    target, done = universal_checkpoint(found, paths, process_group)
    assert not done["cached"] and done["bytes"] > 0 and (target / MANIFEST).is_file()
    assert not (paths.universal_root / "latest_universal").exists()
    _, done = universal_checkpoint(found, paths, process_group)
    assert done["cached"]

    moment = next(target.glob("zero/*/exp_avg.pt"))  # flip one byte of one Adam moment
    data = bytearray(moment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    moment.write_bytes(bytes(data))
    _, done = universal_checkpoint(found, paths, process_group)
    assert not done["cached"] and any(moment.name in p for p in done["rebuilt_after"])
    _, done = universal_checkpoint(found, paths, process_group)
    assert done["cached"]

    # A cache made from another checkpoint of the same step is not used.
    manifest = found.path / MANIFEST
    manifest.write_text(manifest.read_text().replace('"created"', '"created" ', 1))
    _, done = universal_checkpoint(found, paths, process_group)
    assert not done["cached"] and "rebuilt_after" not in done

    # A conversion that fails names the checkpoint and the way out, and leaves no cache.
    shutil.rmtree(target)
    for f in found.path.glob("*optim_states.pt"):
        f.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"(?s)converting checkpoint {found.path.name} for a new "
                                              "world size failed: .* resume with the original"):
        universal_checkpoint(found, paths, process_group)
    assert not target.exists() and not any(paths.universal_root.glob(".*"))

    # Pruning drops the caches of checkpoints that are gone.
    universal_checkpoint_dirs = list(paths.universal_root.iterdir())
    assert universal_checkpoint_dirs == []
    (paths.universal_root / found.path.name).mkdir()
    shutil.rmtree(found.path)
    manager.prune()
    assert list(paths.universal_root.iterdir()) == []


# (allowed micro sizes, layout before, layout after). With accumulation 2 the error comes after
# the first micro-batch's backward pass: its gradient must be dropped, not counted twice.
@pytest.mark.parametrize("micros, before, after", [
    ("[8, 4, 2, 1]", (8, 1), (4, 2)),
    ("[4, 2, 1]", (4, 2), (2, 4)),
])
def test_out_of_memory_shrinks_the_micro_batch_and_keeps_the_losses(tmp_path, reference, micros,
                                                                      before, after):
    """An OOM raised inside step 30, after a forward pass: the step is retried, smaller."""
    ref = reference(1)
    run_dir = tmp_path / "run"
    assert support.run(run_dir, sets=[f"placement.micro_batch_sizes={micros}"],
                       env={"TELEPATHY_FAULT": "step.oom@30,times=1"}) == 0, \
        support.log_text(run_dir)
    recovered, = support.events(run_dir, "oom_recovered")
    assert (recovered["step"], recovered["previous_micro_batch"], recovered["previous_accum"],
            recovered["micro_batch"], recovered["accum"]) == (30, *before, *after)
    rows = {r["step"]: r for r in support.metrics(run_dir)}
    assert {(rows[s]["micro_batch"], rows[s]["accum"]) for s in rows if s < 30} == {before}
    assert {(rows[s]["micro_batch"], rows[s]["accum"]) for s in rows if s >= 30} == {after}
    # Bit for bit before the error where the layout is the reference's (micro 8).
    assert_close_losses(support.losses(run_dir), ref, exact_until=29 if before == (8, 1) else 0)
    assert f"out of memory at step 30: retrying with micro-batch {after[0]} x accum {after[1]}" \
        in support.log_text(run_dir)


def test_out_of_memory_retries_are_bounded(tmp_path):
    run_dir = tmp_path / "run"
    rc = support.run(run_dir, env={"TELEPATHY_FAULT": "step.oom@5"},
                     sets=["placement.max_oom_retries=2"])
    assert rc == 1
    assert [e["micro_batch"] for e in support.events(run_dir, "oom_recovered")] == [4, 2]
    error, = support.events(run_dir, "error")
    assert error["error"] == "OutOfMemoryError"
    assert "cannot shrink further (2 recoveries so far, placement.max_oom_retries=2)" in \
        support.log_text(run_dir)
