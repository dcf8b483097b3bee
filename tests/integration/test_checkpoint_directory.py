"""The one definition of a complete checkpoint and the one prune, on real directories."""

import json

from telepathy.checkpoint import directory
from telepathy.checkpoint.manifest import FORMAT, MANIFEST, seal
from telepathy.core.paths import RunPaths


def make(paths, step, manifest="sealed"):
    ckpt = paths.checkpoint(step)
    (ckpt / "telepathy").mkdir(parents=True)
    (ckpt / "telepathy" / "state.json").write_text("{}")
    body = seal({"format": FORMAT, "step": step, "files": {}})
    if manifest == "sealed":
        (ckpt / MANIFEST).write_text(json.dumps(body))
    elif manifest == "damaged":  # a flipped high bit: not even valid UTF-8
        (ckpt / MANIFEST).write_bytes(json.dumps(body).encode().replace(b"{", b"\xfb", 1))
    elif manifest == "tampered":  # valid JSON, but its own checksum differs
        (ckpt / MANIFEST).write_text(json.dumps({**body, "step": step + 1}))
    return ckpt


def test_complete_means_a_manifest_that_parses_and_matches_its_own_checksum(tmp_path):
    paths = RunPaths.at(tmp_path)
    make(paths, 10), make(paths, 20, "damaged"), make(paths, 30, "tampered"), make(paths, 40, None)
    assert directory.complete_steps(paths.checkpoints) == [10]
    assert [s for s, _ in directory.candidates(paths.checkpoints)] == [40, 30, 20, 10]


def test_prune_keeps_the_newest_complete_and_leaves_damaged_ones_for_inspection(tmp_path):
    paths = RunPaths.at(tmp_path)
    for step in (10, 20, 30, 50, 60):
        make(paths, step)
    make(paths, 5, None)           # an old leftover: deleted
    make(paths, 40, "damaged")     # damaged: left for resume to set aside
    make(paths, 70, None)          # newer than every complete one: may be a save in progress
    (paths.universal(10)).mkdir(parents=True)
    (paths.universal(60)).mkdir(parents=True)
    removed = directory.prune(paths, keep=2)
    assert removed == ["step_00000005", "step_00000010", "step_00000020", "step_00000030"]
    left = [s for s, _ in directory.candidates(paths.checkpoints)]
    assert left == [70, 60, 50, 40]
    assert sorted(p.name for p in paths.universal_root.iterdir()) == ["step_00000060"]


def test_prune_with_a_check_keeps_the_newest_that_pass(tmp_path):
    paths = RunPaths.at(tmp_path)
    for step in (10, 20, 30):
        make(paths, step)
    removed = directory.prune(paths, keep=1, check=lambda ckpt: not ckpt.name.endswith("30"))
    assert removed == ["step_00000010"] and directory.complete_steps(paths.checkpoints) == [20, 30]
    assert directory.prune(paths, keep=3, check=lambda ckpt: False) == []  # too few pass
