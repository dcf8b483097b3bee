"""Resume on another GPU count, and out-of-memory recovery: real DeepSpeed ZeRO-3 on CPU (gloo)."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from telepathy.checkpoint import CheckpointManager
from telepathy.config import load_config
from telepathy.distributed import Dist, free_port
from telepathy.elastic import universal_checkpoint
from telepathy.errors import CheckpointError
from telepathy.paths import MANIFEST, RunPaths
from telepathy.schedule import lr_factor
from tests import helpers
from tests.helpers import RNG

RTOL = 1e-5


def assert_close_losses(got, ref, exact_until):
    assert sorted(got) == sorted(ref), "the run did not log every step"
    exact = [s for s in ref if s <= exact_until and got[s] != ref[s]]
    assert not exact, f"losses before the first world-size change differ: {exact[:5]}"
    far = [(s, ref[s], got[s]) for s in ref if abs(got[s] - ref[s]) > RTOL * abs(ref[s])]
    assert not far, f"losses differ by more than {RTOL} relative at (step, ref, got): {far[:5]}"


def assert_same_state(saved, loaded):
    a, b = load_file(saved), load_file(loaded)
    assert sorted(a) == sorted(b) and len(a) > 0
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"optimizer state changed across the world-size change: {differ[:5]}"
    with safe_open(saved, "pt") as f, safe_open(loaded, "pt") as g:
        groups = json.loads(f.metadata()["param_groups"])
        assert json.loads(g.metadata()["param_groups"]) == groups
        steps = json.loads(f.metadata()["adam_steps"])
        assert json.loads(g.metadata()["adam_steps"]) == steps
    assert [grp["weight_decay"] for grp in groups] == [0.1, 0.0]  # not all group 0's
    assert len(steps) == 2 and len(set(steps)) == 1


def test_world_size_1_to_2_to_1_resumes_with_the_same_state_and_losses(tmp_path, reference):
    """Preempted at world 1, resumed and preempted at world 2, finished at world 1."""
    ref = reference(1)
    run_dir, dumps = tmp_path / "run", tmp_path / "dumps"
    env = {"TELEPATHY_DUMP_STATE": str(dumps)}
    rc, _ = helpers.interrupt(run_dir, RNG.randint(21, 30), world=1, env=env)
    assert rc == 75, helpers.log_text(run_dir)
    first = helpers.events(run_dir, "preempted")[-1]["step"]
    helpers.interrupt(run_dir, first + RNG.randint(3, 12), world=2, env=env)
    second = helpers.events(run_dir, "preempted")[-1]["step"]
    assert second > first
    assert helpers.run(run_dir, world=1, env=env) == 0, helpers.log_text(run_dir)

    changes = helpers.events(run_dir, "world_size_changed")
    assert [(e["from_world_size"], e["to_world_size"], e["step"], e["cached"]) for e in changes] \
        == [(1, 2, first, False), (2, 1, second, False)]
    assert_same_state(dumps / f"saved-step{first}-w1.safetensors",
                      dumps / f"loaded-step{first}-w2.safetensors")
    assert_same_state(dumps / f"saved-step{second}-w2.safetensors",
                      dumps / f"loaded-step{second}-w1.safetensors")
    assert_close_losses(helpers.losses(run_dir), ref, exact_until=first)
    rows = helpers.metrics(run_dir)
    assert {r["world_size"] for r in rows if first < r["step"] <= second} == {2}
    assert {r["world_size"] for r in rows if r["step"] > second} == {1}
    # The LR schedule went on where it stopped: every step used the uninterrupted run's lr.
    train = load_config(helpers.CONFIG, helpers.SETS).train
    wrong = [r["step"] for r in rows
             if r["lr"] != pytest.approx(train.lr * lr_factor(r["step"] - 1, train), rel=1e-9)]
    assert not wrong, f"lr off schedule at steps {wrong[:5]}"


@pytest.fixture
def process_group():
    """A real gloo process group of one rank in this test process."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                         rank=0, world_size=1)
    yield Dist(0, 1, torch.device("cpu"))
    torch.distributed.destroy_process_group()


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
    assert helpers.run(run_dir, sets=[f"placement.micro_batch_sizes={micros}"],
                       env={"TELEPATHY_FAULT": "step.oom@30,times=1"}) == 0, \
        helpers.log_text(run_dir)
    recovered, = helpers.events(run_dir, "oom_recovered")
    assert (recovered["step"], recovered["previous_micro_batch"], recovered["previous_accum"],
            recovered["micro_batch"], recovered["accum"]) == (30, *before, *after)
    rows = {r["step"]: r for r in helpers.metrics(run_dir)}
    assert {(rows[s]["micro_batch"], rows[s]["accum"]) for s in rows if s < 30} == {before}
    assert {(rows[s]["micro_batch"], rows[s]["accum"]) for s in rows if s >= 30} == {after}
    # Bit for bit before the error where the layout is the reference's (micro 8).
    assert_close_losses(helpers.losses(run_dir), ref, exact_until=29 if before == (8, 1) else 0)
    assert f"out of memory at step 30: retrying with micro-batch {after[0]} x accum {after[1]}" \
        in helpers.log_text(run_dir)


def test_out_of_memory_retries_are_bounded(tmp_path):
    run_dir = tmp_path / "run"
    rc = helpers.run(run_dir, env={"TELEPATHY_FAULT": "step.oom@5"},
                     sets=["placement.max_oom_retries=2"])
    assert rc == 1
    assert [e["micro_batch"] for e in helpers.events(run_dir, "oom_recovered")] == [4, 2]
    error, = helpers.events(run_dir, "error")
    assert error["error"] == "OutOfMemoryError"
    assert "cannot shrink further (2 recoveries so far, placement.max_oom_retries=2)" in \
        helpers.log_text(run_dir)
