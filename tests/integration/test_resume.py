"""Acceptance of the training core: real DeepSpeed ZeRO-3 processes, real signals, real files."""

import signal

import pytest

from telepathy.checkpoint.manifest import MANIFEST
from telepathy.core.paths import RunPaths
from telepathy.train.resume import main
from tests import support
from tests.support import MODEL, OPTIM, RANK_STATE, RNG, STATE, assert_same_losses, damage


@pytest.mark.parametrize("world", [1, 2])
def test_resume_after_sigterm_matches_uninterrupted_losses(tmp_path, reference, world):
    """Two SIGTERMs at random steps; the final run's every loss equals the uninterrupted run's."""
    ref = reference(world)
    run_dir = tmp_path / "run"
    stops = sorted(RNG.sample(range(3, 46), 2))
    for k, stop in enumerate(stops, start=1):
        rc, seen = support.interrupt(run_dir, stop, world)
        preempted = support.events(run_dir, "preempted")
        assert len(preempted) == k and preempted[-1]["exit_code"] == 75
        if world == 1:  # torchrun itself exits 1 after forwarding a signal
            assert rc == 75, support.log_text(run_dir)
        saved = preempted[-1]["step"]
        assert saved >= seen and (RunPaths.at(run_dir).checkpoint(saved) / MANIFEST).exists()
        got = support.losses(run_dir)
        assert [s for s in got if got[s] != ref[s]] == [], f"losses differ after interruption {k}"
    assert support.run(run_dir, world) == 0, support.log_text(run_dir)

    assert_same_losses(run_dir, ref)
    resumes = support.events(run_dir, "resume")
    assert [e["restart"] for e in resumes] == [1, 2]
    # rank 0's two ZeRO-3 files (model and optimizer states) deserialised from the bytes its
    # verification read: read once, not twice
    assert [e["files_read_once"] for e in resumes] == [2, 2]
    rows = [r for r in support.metrics(run_dir) if r["step"] > resumes[-1]["step"]]
    assert rows and all(r["restart"] == 2 and r["world_size"] == world for r in rows)


def test_signals_during_a_save_finish_the_save_then_exit_for_requeue(tmp_path, reference):
    """SIGTERM twice while the checkpoint of step 40 is being written (held open for 4 s)."""
    run_dir = tmp_path / "run"
    proc = support.start(run_dir, env={"TELEPATHY_FAULT": "save.engine_done@40,sleep=4"})
    support.wait_for_step(run_dir / "metrics.jsonl", 40, 120)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    assert support.finish(proc) == 75, support.log_text(run_dir)
    preempted, = support.events(run_dir, "preempted")
    assert preempted["step"] == 40  # no second save of the same step, no step after it
    assert [e["step"] for e in support.events(run_dir, "checkpoint_saved")] == [20, 40]
    assert (RunPaths.at(run_dir).checkpoint(40) / MANIFEST).exists()
    assert support.run(run_dir) == 0
    assert_same_losses(run_dir, reference(1))


def test_signal_before_the_first_step_exits_for_requeue_without_saving(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = support.start(run_dir)
    # The handler is installed right after the config is read, long before the model exists.
    import time
    deadline = time.monotonic() + 60
    while not support.events(run_dir, "launch") and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert support.finish(proc) == 75, support.log_text(run_dir)
    assert support.events(run_dir, "preempted")[0]["step"] == 0
    assert not RunPaths.at(run_dir).checkpoints.exists() or not any(
        RunPaths.at(run_dir).checkpoints.glob("step_*"))
    assert support.run(run_dir) == 0
    assert_same_losses(run_dir, reference(1))


# Each case damages the newest checkpoint (~47) and the one before it (40) in different ways:
# both must be detected and the run must resume from step 20 and finish exactly.
@pytest.mark.parametrize("newest, older", [
    ((MODEL, "flip"), (OPTIM, "truncate")),
    ((OPTIM, "flip"), (RANK_STATE, "delete")),
    ((RANK_STATE, "flip"), (STATE, "flip")),
    ((MANIFEST, "flip"), (MODEL, "delete")),
])
def test_damaged_checkpoints_are_detected_and_an_older_one_used(
        preempted_run, copy_of, reference, newest, older):
    run_dir = copy_of(preempted_run)
    paths = RunPaths.at(run_dir)
    ckpts = sorted(paths.checkpoints.glob("step_*"))
    assert [c.name for c in ckpts[:2]] == ["step_00000020", "step_00000040"] and len(ckpts) == 3
    damaged = {ckpts[2].name: newest, ckpts[1].name: older}
    for name, (file, how) in damaged.items():
        damage(paths.checkpoints / name / file, how)

    assert support.run(run_dir) == 0, support.log_text(run_dir)
    rejected = {r["checkpoint"]: " ".join(r["problems"])
                for r in support.events(run_dir, "checkpoint_rejected")}
    assert sorted(rejected) == sorted(damaged)
    for name, (file, how) in damaged.items():
        if file == MANIFEST:  # a flipped byte breaks the JSON or changes a listed size or hash
            assert "manifest" in rejected[name]
            continue
        assert file in rejected[name]
        expect = {"flip": "manifest says", "truncate": "size", "delete": "missing"}[how]
        assert expect in rejected[name]
        assert any((paths.checkpoints / "rejected").glob(f"{name}-*"))
    assert support.events(run_dir, "resume")[-1]["checkpoint"] == "step_00000020"
    assert_same_losses(run_dir, reference(1))


# DeepSpeed's files written / all files written and hashed / manifest in its temp file /
# manifest in place, before pruning / an old checkpoint half deleted by pruning; and the step
# the next start resumes from.
KILLS = [("save.engine_done@40", 20), ("save.hashed@40", 20), ("save.manifest_tmp@40", 20),
         ("save.done@40", 40), ("prune.manifest_removed@20", 60)]


def test_sigkill_at_each_point_of_a_save_leaves_a_run_that_resumes_exactly(tmp_path, reference):
    """One run directory SIGKILLed at each point of the save path in turn. Each start after a
    kill resumes from the newest complete checkpoint, setting aside what the kill left half
    written, and is itself the next kill (the last runs to the end): six starts where a fresh
    run for each kill would take ten, with the same checks after each kill. The run ends with
    the uninterrupted run's losses and no incomplete checkpoint left."""
    run_dir = tmp_path / "run"
    sets = ["checkpoint.keep=2"]
    rc = support.run(run_dir, sets=sets, env={"TELEPATHY_FAULT": KILLS[0][0]})
    assert rc == -signal.SIGKILL, support.log_text(run_dir)[-3000:]
    for k, (fault, resume_step) in enumerate(KILLS):
        following = KILLS[k + 1][0] if k + 1 < len(KILLS) else None
        rc = support.run(run_dir, sets=sets,
                         env={"TELEPATHY_FAULT": following} if following else None)
        log = support.log_text(run_dir)[-3000:]
        assert rc == (-signal.SIGKILL if following else 0), (fault, following, log)
        resumes = support.events(run_dir, "resume")
        assert [e["restart"] for e in resumes] == list(range(1, k + 2)), (fault, log)
        assert resumes[-1]["step"] == resume_step, (fault, resumes[-1], log)
        if resume_step == 20:  # the kill came before the manifest was in place
            rejected = [e for e in support.events(run_dir, "checkpoint_rejected")
                        if e["restart"] == k + 1]
            assert [(e["checkpoint"], e["problems"]) for e in rejected] == \
                [("step_00000040", ["no manifest (incomplete)"])], (fault, rejected)
    assert_same_losses(run_dir, reference(1))
    leftovers = [p.name for p in RunPaths.at(run_dir).checkpoints.glob("step_*")
                 if not (p / MANIFEST).exists()]
    assert leftovers == []


def test_resume_refuses_a_changed_global_batch_unless_forced(preempted_run, copy_of, capsys):
    run_dir = copy_of(preempted_run)
    rc = support.run(run_dir, sets=["train.global_batch=16"])
    assert rc == 2
    log = support.log_text(run_dir)
    assert "train.global_batch: 8 -> 16" in log and "--force" in log
    assert support.run(run_dir, sets=["train.global_batch=16"], extra=["--force"]) == 0
    assert support.events(run_dir, "config_forced")[0]["changes"] == ["train.global_batch: 8 -> 16"]


@pytest.mark.parametrize("sets, message", [
    (["train.stepz=3"], "unknown key train.stepz in train; valid keys: steps,"),
    (["train.global_batch=eight"], "train.global_batch='eight' has the wrong type: expected int"),
    (["checkpoint.keep=1"], "checkpoint.keep=1 is invalid: keep at least 2"),
    (["data.path=/nonexistent/tokens.npy"], "data file '/nonexistent/tokens.npy' does not exist; "
                                            "set data.path"),
])
def test_bad_config_fails_fast_before_distributed_work(tmp_path, capsys, sets, message):
    import sys
    argv = ["--config", support.CONFIG, "--run-dir", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert "deepspeed" not in sys.modules or not __import__("torch").distributed.is_initialized()
    assert not (tmp_path / "run").exists()
