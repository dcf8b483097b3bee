"""Checkpoints worth trusting: hashing while writing, the checkpoint CLI, background saves under
SIGKILL, a full disk, and signals. Real processes, real files, a real small filesystem."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from telepathy.checkpoint.cli import main as checkpoint_cli
from telepathy.checkpoint.directory import read_manifest
from telepathy.checkpoint.hashing import HASHES, HashingFile, hash_file, units_of, verify
from telepathy.checkpoint.manifest import MANIFEST, seal
from telepathy.core.paths import RunPaths
from telepathy.core.runlock import RunLock
from tests import support
from tests.support import MODEL, OPTIM, RNG, assert_same_losses, damage


def reference_digest(algorithm, data):
    """Each algorithm computed by its own library, not through telepathy."""
    import blake3
    import xxhash
    return {"sha256": lambda: hashlib.sha256(data).hexdigest(),
            "xxh3_128": lambda: xxhash.xxh3_128(data).hexdigest(),
            "blake3": lambda: blake3.blake3(data).hexdigest()}[algorithm]()


@pytest.mark.parametrize("algorithm", HASHES)
@pytest.mark.parametrize("sizes", [[0], [1], [7, 9], [16], [5, 11, 16, 3], [40]])
def test_hashing_while_writing_equals_hashing_the_file(tmp_path, sizes, algorithm):
    """Writes of any size, across 16-byte chunk boundaries: the same chunks as reading back."""
    data = [os.urandom(n) for n in sizes]
    with ThreadPoolExecutor(2) as pool:
        f = HashingFile(tmp_path / "f", pool, chunk_bytes=16, algorithm=algorithm)
        for piece in data:
            f.write(piece)
        entry = f.close()
    whole = b"".join(data)
    assert (tmp_path / "f").read_bytes() == whole
    assert entry == hash_file(tmp_path / "f", chunk_bytes=16, algorithm=algorithm)
    expected = [reference_digest(algorithm, whole[i:i + 16]) for i in range(0, len(whole), 16)]
    assert entry["hash"] == algorithm
    assert entry["chunks"] == (expected or [reference_digest(algorithm, b"")])


def test_torch_save_through_the_hashing_file_round_trips(tmp_path):
    state = {"w": torch.randn(300, 300), "step": 7, "nested": [torch.arange(5), {"x": 1.5}]}
    with ThreadPoolExecutor(2) as pool:
        f = HashingFile(tmp_path / "s.pt", pool, chunk_bytes=4096)
        torch.save(state, f)
        entry = f.close()
    assert entry == hash_file(tmp_path / "s.pt", chunk_bytes=4096) and len(entry["chunks"]) > 10
    loaded = torch.load(tmp_path / "s.pt", weights_only=False)
    assert torch.equal(loaded["w"], state["w"]) and loaded["nested"][1] == {"x": 1.5}


def cli(capsys, *argv):
    rc = checkpoint_cli(list(argv))
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_checkpoint_cli_lists_verifies_and_prunes(preempted_run, copy_of, capsys):
    run_dir = copy_of(preempted_run)
    paths = RunPaths.at(run_dir)
    names = sorted(p.name for p in paths.checkpoints.glob("step_*"))
    assert len(names) == 3

    rc, out = cli(capsys, "verify", str(run_dir), "--json")
    rows = json.loads(out)
    assert rc == 0 and [r["status"] for r in rows] == ["valid"] * 3
    assert [r["checkpoint"] for r in rows] == names[::-1] and all(r["bytes"] > 0 for r in rows)

    damage(paths.checkpoints / names[2] / OPTIM, "flip")
    damage(paths.checkpoints / names[0] / MODEL, "truncate")
    (paths.checkpoints / names[1] / MANIFEST).rename(paths.checkpoints / names[1] / "M.bak")
    rc, out = cli(capsys, "verify", str(paths.checkpoints))
    assert rc == 1
    assert f"{names[2]}: {OPTIM}: bytes 0-" in out and "manifest says" in out
    assert f"{names[0]}: {MODEL}: size" in out and f"{names[1]}: no manifest" in out
    for status in ("corrupt", "incomplete"):
        assert status in out

    rc, out = cli(capsys, "list", str(run_dir), "--json")  # no hashing: the flip goes unseen
    assert rc == 0 and [r["status"] for r in json.loads(out)] == ["complete", "incomplete", "complete"]

    (paths.checkpoints / names[1] / "M.bak").rename(paths.checkpoints / names[1] / MANIFEST)
    with RunLock(paths.lock, "4242"):
        rc, out = cli(capsys, "prune", str(run_dir), "--keep", "1")
        assert rc == 2 and "in use by a live job" in out and '"job_id": "4242"' in out
    rc, out = cli(capsys, "prune", str(run_dir), "--keep", "1")
    # The newest is corrupt: the newest *valid* one (40) is kept, 20 goes, 47 stays to inspect.
    assert rc == 0 and names[0] in out
    assert sorted(p.name for p in paths.checkpoints.glob("step_*")) == names[1:]
    rc, out = cli(capsys, "verify", str(tmp := run_dir / "nothing"))
    assert rc == 2 and f"{tmp / 'checkpoints'} does not exist" in out


# Background writes: between two files, before the manifest, mid-pruning, and in the snapshot.
POINTS = ["save.start", "save.engine_done", "save.file_written", "save.hashed",
          "save.manifest_tmp", "save.done"]


@pytest.mark.parametrize("mode", ["background", "synchronous"])
def test_sigkill_at_a_random_point_of_a_save_resumes_exactly(tmp_path, reference, mode):
    """Background saves copy a snapshot; synchronous ones (checkpoint.async_save false, as a
    preemption's) write host tensors in place: a SIGKILL at any point leaves a resumable run."""
    point, step = RNG.choice(POINTS), RNG.choice([20, 40])
    print(f"SIGKILL at {point}@{step}")
    run_dir = tmp_path / "run"
    sets = ["checkpoint.async_save=false"] if mode == "synchronous" else []
    rc = support.run(run_dir, sets=sets, env={"TELEPATHY_FAULT": f"{point}@{step}"})
    assert rc == -signal.SIGKILL, support.log_text(run_dir)
    assert support.run(run_dir, sets=sets) == 0, support.log_text(run_dir)
    assert_same_losses(run_dir, reference(1))
    complete = point == "save.done"
    resumed, = [e["step"] for e in support.events(run_dir, "resume")] or [0]
    assert resumed == (step if complete else step - 20), (point, step)
    assert all((p / MANIFEST).exists() for p in RunPaths.at(run_dir).checkpoints.glob("step_*"))


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MB tmpfs mounted at tmp_path/run (the run's log file stays outside it)."""
    mount = tmp_path / "run"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"cannot mount a tmpfs: {done.stderr}"
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("mode", ["background", "synchronous"])
def test_disk_full_during_a_save_is_reported_and_leaves_the_run_resumable(small_fs, reference,
                                                                           mode):
    """The filesystem fills up between the space check and the write of checkpoint 40."""
    run_dir = small_fs
    sets = ["checkpoint.async_save=false"] if mode == "synchronous" else []
    proc = support.start(run_dir, sets=sets, env={"TELEPATHY_FAULT": "save.start@40,sleep=3;"
                                                                     "step.start@50,sleep=6"})
    support.wait_for_step(run_dir / "metrics.jsonl", 40, 120)
    free = shutil.disk_usage(run_dir).free
    filler = run_dir / "filler"
    filler.write_bytes(b"\0" * max(0, free - 256 * 1024))  # 256 KB left: logs fit, a save not
    deadline = time.monotonic() + 60
    while not support.events(run_dir, "checkpoint_failed"):
        assert time.monotonic() < deadline and proc.poll() is None, support.log_text(run_dir)
        time.sleep(0.05)
    filler.unlink()
    assert support.finish(proc) == 0, support.log_text(run_dir)

    failed, = support.events(run_dir, "checkpoint_failed")
    assert failed["step"] == 40 and "No space left on device" in failed["error"]
    assert "checkpoint step 40 (interval_steps) FAILED" in support.log_text(run_dir)
    assert [e["step"] for e in support.events(run_dir, "checkpoint_saved")] == [20, 60]
    assert sorted(p.name for p in RunPaths.at(run_dir).checkpoints.glob("step_*")) == \
        ["step_00000020", "step_00000060"]  # the partial 40 was removed at once
    assert_same_losses(run_dir, reference(1))


def test_a_signal_during_a_background_save_and_another_during_the_final_save(tmp_path, reference):
    """SIGTERM while checkpoint 40 is still being written in the background (held 4 s), and a
    second SIGTERM while the final save holds the training loop (2 s)."""
    run_dir = tmp_path / "run"
    proc = support.start(run_dir, env={"TELEPATHY_FAULT": "save.file_written@40,sleep=4;"
                                                          "save.engine_done@*,sleep=2"})
    support.wait_for_step(run_dir / "metrics.jsonl", 41, 120)  # training goes on meanwhile
    assert not (RunPaths.at(run_dir).checkpoint(40) / MANIFEST).exists()
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while not [e for e in support.events(run_dir, "checkpoint_started")
               if e["reason"] == "preemption"]:
        assert time.monotonic() < deadline, support.log_text(run_dir)
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert support.finish(proc) == 75, support.log_text(run_dir)
    preempted, = support.events(run_dir, "preempted")
    saved = {e["step"]: e["reason"] for e in support.events(run_dir, "checkpoint_saved")}
    assert saved[40] == "interval_steps" and saved[preempted["step"]] == "preemption"
    assert preempted["step"] > 40
    assert support.run(run_dir) == 0
    assert_same_losses(run_dir, reference(1))


def test_verify_checks_chunks_and_stray_files(preempted_run, copy_of):
    run_dir = copy_of(preempted_run)
    ckpt = sorted(RunPaths.at(run_dir).checkpoints.glob("step_*"))[-1]
    manifest = read_manifest(ckpt)
    assert (manifest["format"], manifest["hash"]) == ("telepathy-checkpoint/3", "xxh3_128")
    assert verify(ckpt, manifest, units_of(ckpt, manifest)) == []
    (ckpt / "telepathy" / "extra.bin").write_bytes(b"x")
    assert verify(ckpt, manifest, units_of(ckpt, manifest)) == [
        "telepathy/extra.bin: not listed in the manifest (stray file)"]


@pytest.mark.parametrize("kind", ["format 2 (sha256_chunks)", *HASHES])
def test_every_hash_and_an_older_format_verify_and_catch_a_flipped_byte(preempted_run, copy_of,
                                                                        kind):
    """The manifest names its algorithm: a checkpoint sealed with any of them (or a format-2 one,
    from before the choice) verifies, and one flipped byte anywhere is caught."""
    run_dir = copy_of(preempted_run)
    ckpt = sorted(RunPaths.at(run_dir).checkpoints.glob("step_*"))[-1]
    old = read_manifest(ckpt)
    algorithm = "sha256" if kind.startswith("format 2") else kind
    files = {n: hash_file(ckpt / n, chunk_bytes=4096, algorithm=algorithm) for n in old["files"]}
    if kind.startswith("format 2"):
        files = {n: {"size": e["size"], "chunk_bytes": e["chunk_bytes"],
                     "sha256_chunks": e["chunks"], "digest": e["digest"]} for n, e in files.items()}
        manifest = {**old, "format": "telepathy-checkpoint/2", "files": files}
        manifest.pop("hash", None)
    else:
        manifest = {**old, "hash": algorithm, "files": files}
    (ckpt / MANIFEST).write_text(json.dumps(seal({k: v for k, v in manifest.items()
                                                 if k != "manifest_sha256"})))
    manifest = read_manifest(ckpt)
    assert manifest is not None and verify(ckpt, manifest, units_of(ckpt, manifest)) == []
    name = RNG.choice(sorted(files))
    damage(ckpt / name, "flip")
    problems = verify(ckpt, manifest, units_of(ckpt, manifest))
    assert len(problems) == 1 and problems[0].startswith(f"{name}: bytes ")
    assert f"have {algorithm} " in problems[0]
