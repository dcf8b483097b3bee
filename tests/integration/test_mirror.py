"""The checkpoint mirror (checkpoint.mirror) against a real S3 endpoint: moto's standalone server
on 127.0.0.1, reached over HTTP by s3fs (telepathy) and read with boto3 (the other tool). The
endpoint and keys come from the standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""

import os
import shutil
import signal
import time

import pytest

from telepathy.checkpoint import cli as checkpoint_cli
from telepathy.checkpoint import directory, mirror
from telepathy.checkpoint.hashing import verify_all
from telepathy.core.errors import ConfigError
from telepathy.core.events import Event
from telepathy.core.paths import RunPaths
from telepathy.export import cli as export_cli
from telepathy.watch import report
from tests import support
from tests.support import FAST_MIRROR, matches_manifest, mirror_objects


@pytest.fixture
def aws(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


def flip_byte(client, bucket: str, key: str) -> None:
    """Damage a stored object with the store's own API: one byte flipped in its middle."""
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))


def largest(manifest: dict) -> str:
    return max(manifest["files"], key=lambda n: manifest["files"][n]["size"])


def test_upload_verify_resume_an_upload_fall_back_and_prune(aws, reference_run, tmp_path):
    """In process, on a real run's checkpoints (20, 40, 60): the uploader's pass puts the newest
    `keep` on the mirror, each object equal (boto3) to the manifest's checksums; an upload cut
    between a file and the manifest goes on with what is missing only; a flipped byte is found by
    `verify` and makes a fetch fall back to the previous checkpoint; pruning never removes the
    newest complete one."""
    source = RunPaths.at(reference_run(1))
    bucket, client = aws.bucket(), aws.client()
    store = mirror.open_store(f"s3://{bucket}/runs/a")
    events = []
    uploader = mirror.Uploader(store, source, keep=3, report=lambda e, **f: events.append((e, f)))
    uploader.sync()
    assert mirrored_steps(store) == [60, 40, 20]
    objects = mirror_objects(client, bucket, "runs/a/checkpoints")
    for step in (20, 40, 60):
        manifest = directory.read_manifest(source.checkpoint(step))
        name = source.checkpoint(step).name
        assert objects[f"{name}/MANIFEST.json"] == (source.checkpoint(step) / "MANIFEST.json").read_bytes()
        for rel, entry in manifest["files"].items():
            assert matches_manifest(objects[f"{name}/{rel}"], entry), rel
    assert [f["step"] for e, f in events if e == Event.MIRROR_UPLOADED] == [60, 40, 20]
    url = f"s3://{bucket}/runs/a"
    assert checkpoint_cli.main(["verify", url, "--json"]) == 0
    # `telepathy export` from the mirror writes what it writes from the run directory.
    assert export_cli.main([url, "--out", str(tmp_path / "from-mirror"), "--step", "40"]) == 0
    export_cli.main([str(source.root), "--out", str(tmp_path / "from-run"), "--step", "40"])
    made = sorted(p.name for p in (tmp_path / "from-run").iterdir())
    assert sorted(p.name for p in (tmp_path / "from-mirror").iterdir()) == made
    for name in made:
        if name.endswith(".safetensors"):
            assert (tmp_path / "from-mirror" / name).read_bytes() == \
                (tmp_path / "from-run" / name).read_bytes()

    # Cut short: the manifest and one file of step 60 gone: 60 no longer counts; a pass
    # uploads that one file and the manifest, nothing else.
    m60 = directory.read_manifest(source.checkpoint(60))
    name60 = source.checkpoint(60).name
    client.delete_object(Bucket=bucket, Key=f"runs/a/checkpoints/{name60}/MANIFEST.json")
    client.delete_object(Bucket=bucket, Key=f"runs/a/checkpoints/{name60}/{largest(m60)}")
    assert [s for s, _, _ in store.complete()] == [40, 20]
    events.clear()
    uploader.sync()
    (_, done), = [(e, f) for e, f in events if e == Event.MIRROR_UPLOADED]
    assert done["step"] == 60 and done["uploaded_files"] == 1
    assert done["uploaded_bytes"] == m60["files"][largest(m60)]["size"]

    # A byte flipped in the newest mirrored checkpoint: verify names the file and its bytes;
    # a fetch into an empty run directory falls back to 40 and says so.
    flip_byte(client, bucket, f"runs/a/checkpoints/{name60}/{largest(m60)}")
    problems = mirror.verify(store, name60, m60)
    assert len(problems) == 1 and largest(m60) in problems[0] and "bytes" in problems[0]
    assert checkpoint_cli.main(["verify", url]) == 1  # the newest is not valid
    fresh = RunPaths.at(tmp_path / "fresh")
    fresh.checkpoints.mkdir(parents=True)
    events.clear()
    assert mirror.fetch(store, fresh, -1, report=lambda e, **f: events.append((e, f))) == 40
    assert [e for e, _ in events] == [Event.MIRROR_REJECTED, Event.MIRROR_FETCHED]
    assert largest(m60) in events[0][1]["problems"][0]
    got = fresh.checkpoint(40)
    assert verify_all(got, directory.read_manifest(got)) == []
    assert sorted(p.name for p in fresh.checkpoints.iterdir()) == [got.name]  # no partial left
    for rel in directory.read_manifest(got)["files"]:
        assert (got / rel).read_bytes() == (source.checkpoint(40) / rel).read_bytes()

    # The damaged copy stopped counting when it was found; the next pass replaces it.
    assert store.manifest(name60) is None
    uploader.sync()
    assert mirror.verify(store, name60, m60) == [] and mirrored_steps(store) == [60, 40, 20]

    # Pruning to 2: 20 goes; a newer prefix without a manifest (an upload in progress) stays,
    # an older one goes; the newest complete one is never removed.
    client.put_object(Bucket=bucket, Key="runs/a/checkpoints/step_00000080/x.pt", Body=b"partial")
    client.put_object(Bucket=bucket, Key="runs/a/checkpoints/step_00000010/x.pt", Body=b"old")
    removed = mirror.prune(store, keep=2, best=None, uploading=set())
    assert removed == ["step_00000010", "step_00000020"]
    assert [s for s, _ in store.names()] == [80, 60, 40]
    assert mirror.prune(store, keep=2, best=None, uploading=set()) == []
    assert [s for s, _, _ in store.complete()][0] == 60


def test_a_store_refusing_writes_is_reported_and_never_counted(aws, reference_run, monkeypatch):
    """Keys that may read the bucket but not write it (the server checking them against its IAM
    policies): every pass fails with the store's refusal, retried and reported (mirror_failed
    naming it), and nothing counts on the mirror; with write access back, the next pass
    uploads."""
    source = RunPaths.at(reference_run(1))
    bucket = aws.bucket()
    reader = aws.read_only_keys(bucket)
    events = []
    aws.authorizing(True)
    try:
        for key, value in reader.items():
            monkeypatch.setenv(key, value)
        store = mirror.open_store(f"s3://{bucket}/runs/r")
        uploader = mirror.Uploader(store, source, keep=2,
                                   report=lambda e, **f: events.append((e, f))).start()
        uploader.wake()
        assert not uploader.finish(5.0)  # it could not finish
        assert mirrored_steps(store) == []  # read access: the listing works, nothing counted
    finally:
        aws.authorizing(False)
    failed = [f for e, f in events if e == Event.MIRROR_FAILED]
    assert failed and failed[0]["error"] == "PermissionError: Access Denied"  # the store's refusal
    assert [e for e, _ in events][-1] == Event.MIRROR_UNFINISHED
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", aws.env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws.env["AWS_SECRET_ACCESS_KEY"])
    mirror.Uploader(mirror.open_store(f"s3://{bucket}/runs/r"), source, keep=2,
                    report=lambda e, **f: None).sync()
    assert mirrored_steps(store) == [60, 40]


def test_a_mirror_url_is_checked_before_any_distributed_work(aws, tmp_path):
    with pytest.raises(ConfigError, match=r"pip install 'telepathy\[mirror\]'"):
        mirror.open_store("gs://bucket/run")  # no gcsfs here: the install command is named
    run_dir = tmp_path / "run"
    assert support.run(run_dir, 1, ["checkpoint.mirror=gs://bucket/run"]) == 2
    assert "pip install 'telepathy[mirror]'" in support.log_text(run_dir)
    assert not RunPaths.at(run_dir).checkpoints.exists()


def mirrored_steps(store) -> list[int]:
    return [s for s, _, _ in store.complete()]


def assert_exact_from(run_dir, reference: dict, first: int) -> None:
    """The run logged every step from `first` on, each loss bit for bit the reference's."""
    got = support.losses(run_dir)
    assert sorted(got) == [s for s in sorted(reference) if s >= first]
    differ = [(s, reference[s], got[s]) for s in got if got[s] != reference[s]]
    assert not differ, f"losses differ from the uninterrupted run at (step, ref, got): {differ[:5]}"


@pytest.mark.parametrize("world", [2])
def test_sigterm_then_the_run_directory_deleted_resumes_from_the_mirror_exactly(
        world, aws, reference, tmp_path):
    """World 2, SIGTERM at a random step: the checkpoint saved at the signal is complete on the
    mirror when the job has exited, every object hashing as its manifest says. Then a byte
    flipped in it on the mirror and the run directory deleted: the same command resumes from
    the mirror, falls back to the previous mirrored checkpoint and says so, every later loss is
    bit for bit the uninterrupted run's, and the run's last checkpoint is mirrored before it
    exits. (The newest mirrored checkpoint fetched as it is: test_upload_verify_...)"""
    bucket = aws.bucket()
    url = f"s3://{bucket}/runs/b"
    sets = [f"checkpoint.mirror={url}", "checkpoint.mirror_keep=2"]
    run_dir = tmp_path / "run"
    stop_at = support.RNG.randint(22, 50)
    rc, seen = support.interrupt(run_dir, stop_at, world, sets, env=aws.env)
    support.assert_preempted(rc, world, run_dir)
    paths = RunPaths.at(run_dir)
    saved = directory.complete_steps(paths.checkpoints)[-1]
    assert saved >= seen
    previous = 40 if saved > 40 else 20
    store = mirror.open_store(url)
    assert mirrored_steps(store) == [saved, previous]
    manifest = directory.read_manifest(paths.checkpoint(saved))
    name = paths.checkpoint(saved).name
    objects = mirror_objects(aws.client(), bucket, f"runs/b/checkpoints/{name}")
    assert sorted(objects) == sorted([*manifest["files"], "MANIFEST.json"])
    assert all(matches_manifest(objects[rel], e) for rel, e in manifest["files"].items())
    assert [e["step"] for e in support.events(run_dir, Event.MIRROR_UPLOADED)][-1] == saved

    flip_byte(aws.client(), bucket, f"runs/b/checkpoints/{name}/{largest(manifest)}")
    shutil.rmtree(run_dir)
    assert support.run(run_dir, world, sets, env=aws.env) == 0, support.log_text(run_dir)
    rejected, = support.events(run_dir, Event.MIRROR_REJECTED)
    assert rejected["checkpoint"] == name and largest(manifest) in rejected["problems"][0]
    fetched, = support.events(run_dir, Event.MIRROR_FETCHED)
    assert fetched["step"] == previous and "damaged" in support.log_text(run_dir)
    assert_exact_from(run_dir, reference(world), previous + 1)
    assert mirrored_steps(store) == [60, 40]  # the last checkpoint, uploaded before the exit
    assert mirror.verify(store, "step_00000060", store.manifest("step_00000060")) == []


def test_a_kill_before_the_manifest_and_a_hung_server_never_count_and_catch_up(aws, tmp_path):
    """World 1, paced steps (0.15 s each). A SIGKILL between step 20's files and its manifest: nothing counts
    on the mirror. The next start finishes that upload. The server then stopped (SIGSTOP, all
    objects kept) for at least 10 s: training goes on (steps are logged during the outage, none of them
    waiting for the server), mirror_failed says uploads are failing; once the server is back the
    mirror catches up, and no prefix without a manifest ever counted."""
    bucket = aws.bucket()
    url = f"s3://{bucket}/runs/c"
    sets = [f"checkpoint.mirror={url}", "checkpoint.mirror_keep=2", "checkpoint.every_steps=10",
            "train.steps=100", FAST_MIRROR]
    paced = "step.start@*,sleep=0.15"  # 100 steps take about 20 s: the outage happens mid-run
    run_dir = tmp_path / "run"
    store = mirror.open_store(url)
    kill = {**aws.env, "TELEPATHY_FAULT": paced + ";mirror.files_uploaded@20"}
    assert support.run(run_dir, 1, sets, env=kill) == -signal.SIGKILL
    assert 20 in [s for s, _ in store.names()]  # its files are there,
    assert 20 not in mirrored_steps(store) and store.manifest("step_00000020") is None  # not counted

    proc = support.start(run_dir, 1, sets, env={**aws.env, "TELEPATHY_FAULT": paced})
    paths = RunPaths.at(run_dir)
    deadline = time.time() + support.TIMEOUT_S
    while 30 not in mirrored_steps(store):  # the start went on with 20, then 30 came
        assert proc.poll() is None and time.time() < deadline, support.log_text(run_dir)
        time.sleep(0.2)
    restarted_at = support.events(run_dir, "launch")[-1]["time"]
    aws.pause()
    paused_at = time.time()
    try:
        while not support.events(run_dir, Event.MIRROR_FAILED) or time.time() < paused_at + 10:
            assert proc.poll() is None and time.time() < deadline, support.log_text(run_dir)
            time.sleep(0.2)
    finally:
        aws.resume()
    resumed_at = time.time()
    assert support.finish(proc) == 0, support.log_text(run_dir)
    during = [r for r in support.metrics(run_dir) if paused_at <= r["time"] <= resumed_at]
    assert len(during) >= 5  # training went on while the server answered nothing
    failed = support.events(run_dir, Event.MIRROR_FAILED)[0]
    assert failed["url"] == url and failed["time"] >= paused_at
    uploaded = [e["step"] for e in support.events(run_dir, Event.MIRROR_UPLOADED)
                if e["time"] >= restarted_at]
    assert uploaded[0] == 20 and 100 in uploaded  # the unfinished one first
    assert [e for e in support.events(run_dir, Event.MIRROR_UPLOADED) if e["step"] == 20][0][
        "uploaded_files"] == 0  # its files were there and verified: only the manifest went up
    assert mirrored_steps(store) == [100, 90]
    assert [s for s, _ in store.names()] == [100, 90]  # pruned; nothing half-uploaded left
    local = directory.read_manifest(paths.checkpoint(100))
    objects = mirror_objects(aws.client(), bucket, "runs/c/checkpoints/step_00000100")
    assert all(matches_manifest(objects[rel], e) for rel, e in local["files"].items())
    assert os.environ.get("AWS_ENDPOINT_URL") == aws.url  # nothing of the server hard-coded
    seen = report.build(run_dir)  # what `telepathy report` says
    assert seen["mirror"]["uploaded"]["step"] in (100, 90) and seen["mirror"]["failing"] is None
