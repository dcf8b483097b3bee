"""A model and a dataset of the user's own code (model.module, data.module) on real DeepSpeed
ZeRO-3 (CPU, gloo): LatentWire's bridge (examples/bridge) between two frozen causal LMs, a tiny
Llama and a tiny Qwen2 with their own tokenizers, saved locally. SIGTERM at a random step at
world 2 and an exact resume (the losses and the samples each rank's forward received); the same
checkpoint on one rank within 1e-5 (the trained fp32 values and Adam moments carried bit for
bit); checkpoints without the frozen models; a changed base refused; the export loaded back
with load_module. Bad input refused before any distributed work. (Through SLURM and submitit:
tests/slurm/test_slurm.py and test_launch.py; under chaos: tests/slurm/test_chaos.py.)"""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from telepathy.core.paths import RunPaths
from telepathy.export.cli import main as export_main
from telepathy.resume import main as resume_main
from tests import support
from tests.support import BRIDGE_CONFIG, PACED, RNG


def samples(record_dir):
    """{rank: [the sample indices of each forward, in order]}"""
    return {f.stem: [json.loads(line) for line in f.read_text().splitlines()]
            for f in sorted(record_dir.glob("rank*.jsonl"))}


def checkpoint_tensors(ckpt):
    """{name: tensor} of the module's parameters as DeepSpeed's zero_to_fp32 reads them."""
    return support.consolidated(ckpt)


def directory_state(path):
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_the_bridge_resumes_exactly_on_two_ranks_within_rounding_on_one_and_exports(
        bridge_toy, bridge_reference, tmp_path, capsys):
    """World 2: SIGTERM at a random step, the resume bit for bit, every rank's forwards given
    the uninterrupted run's samples; 2 -> 1: losses within 1e-5, the trained parameters' fp32
    values and Adam moments equal after the conversion. The checkpoints hold only the bridge;
    a changed base file is refused (exit 2, named, the run directory untouched); the export
    loads with load_module and gives the checkpointed module's loss."""
    ref2 = bridge_reference(2)
    bases = tmp_path / "bases"  # a copy, to change one of its files at the end
    shutil.copytree(bridge_toy, bases)
    run_dir, fewer, dumps = tmp_path / "run", tmp_path / "fewer", tmp_path / "dumps"
    sets = support.bridge_sets(bases, tmp_path / "samples")
    rc, _ = support.interrupt(run_dir, RNG.randint(2, 12), 2, sets,
                              {**PACED, "TELEPATHY_DUMP_STATE": str(dumps)}, BRIDGE_CONFIG)
    assert rc == 1 and support.events(run_dir, "preempted"), support.log_text(run_dir)
    first = support.events(run_dir, "preempted")[-1]["step"]
    subprocess.run(["cp", "-a", str(run_dir), str(fewer)], check=True)
    assert support.run(run_dir, 2, sets, config=BRIDGE_CONFIG) == 0, support.log_text(run_dir)
    support.assert_same_losses(run_dir, support.losses(ref2))
    assert samples(tmp_path / "samples") == samples(ref2.parent / "samples")

    assert support.run(fewer, 1, sets, {"TELEPATHY_DUMP_STATE": str(dumps)},
                       config=BRIDGE_CONFIG) == 0, support.log_text(fewer)
    assert support.events(fewer, "world_size_changed")
    support.assert_close_losses(support.losses(fewer), support.losses(ref2), exact_until=first)
    support.assert_same_state(dumps / f"saved-step{first}-w2.safetensors",
                              dumps / f"loaded-step{first}-w1.safetensors")

    # The checkpoints hold the bridge alone; the frozen models stay in their directories.
    ckpt = sorted(RunPaths.at(run_dir).checkpoints.glob("step_*"))[-1]
    state = checkpoint_tensors(ckpt)
    assert state and not [n for n in state if n.startswith(("source.", "target."))]
    assert sum(t.numel() for t in state.values()) == support.events(
        run_dir, "start")[0]["trainable"] == json.loads(
        (run_dir / "module-shape.json").read_text())["trainable"]  # for the planner

    # Exported and built again: the loss of a fixed batch as the checkpointed module's.
    out = tmp_path / "export"
    capsys.readouterr()
    assert export_main([str(run_dir), "--out", str(out), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["step"] == 24 and (out / "trained.safetensors").is_file()
    described = json.loads((out / "telepathy-module.json").read_text())
    assert described["module"] == "recording:bridge" and len(described["base_paths"]) == 2
    from telepathy.export import load_module

    loaded = load_module(out).eval()
    checkpointed = support.bridge_module(bases, state).eval()
    batch = support.bridge_batch(bases, range(6))
    with torch.no_grad():
        assert loaded(**batch).item() == pytest.approx(checkpointed(**batch).item(), rel=1e-6)
    # A changed base: refused at the next start and by load_module, the run untouched.
    target = bases / "target" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-7] ^= 0x01
    target.write_bytes(bytes(data))
    before = directory_state(run_dir)
    assert support.run(run_dir, 1, sets, config=BRIDGE_CONFIG) == 2  # (torchrun would say 1)
    assert f"{target} (content differs)" in support.log_text(run_dir)
    assert directory_state(run_dir) == before
    with pytest.raises(Exception, match="model.safetensors"):
        load_module(out)


def test_without_base_paths_the_frozen_models_are_saved_and_stay_their_pretrained_values(
        bridge_toy, tmp_path):
    """No model.base_paths: the checkpoint holds the frozen parameters too (many times the
    bridge alone), and after training every frozen one is bit for bit its pretrained value."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    sets = support.bridge_sets(bridge_toy, None, "model.base_paths=null", "train.steps=4")
    assert support.run(run_dir, 1, sets, config=BRIDGE_CONFIG) == 0, support.log_text(run_dir)
    state = checkpoint_tensors(RunPaths.at(run_dir).checkpoints / "step_00000004")
    trained = support.events(run_dir, "start")[0]["trainable"]
    frozen = {n: t for n, t in state.items() if n.startswith(("source.", "target."))}
    assert sum(t.numel() for t in frozen.values()) > 10 * trained
    for part in ("source", "target"):
        pretrained = load_file(bridge_toy / part / "model.safetensors")
        ours = {n[len(part) + 1:]: t for n, t in frozen.items() if n.startswith(part + ".")}
        assert sorted(ours) == sorted(pretrained)
        assert [n for n in pretrained if not torch.equal(ours[n], pretrained[n])] == []


def test_a_datasets_samples_reach_the_same_steps_at_world_one_two_and_four(bridge_toy):
    """The planner's layouts at 1, 2 and 4 ranks: each optimizer step trains the same samples
    (the ranks' micro-batches together), whatever the split."""
    from telepathy.config import load_config
    from telepathy.data.stream import rank_slice
    from telepathy.train.inputs import data_module_stream, make_plan

    cfg = load_config(BRIDGE_CONFIG, support.bridge_sets(bridge_toy, None, "train.global_batch=8"))
    stream = data_module_stream(cfg)
    per_world = {}
    for world in (1, 2, 4):
        layout = make_plan(cfg, world, None).layout
        steps = []
        for step in range(40):  # past the end of an epoch (256 samples, 8 a step)
            ids = stream.sample_ids(step * 8, 8)
            got = [rank_slice(ids, m, r, world, layout.micro_batch)
                   for m in range(layout.accum) for r in range(world)]
            steps.append(sorted(int(i) for part in got for i in part))
            batch = stream.inputs(np.array(steps[-1]))
            assert batch["index"].tolist() == steps[-1]  # the dataset's own samples
        per_world[world] = steps
    assert per_world[1] == per_world[2] == per_world[4]
    assert len({tuple(s) for s in per_world[1]}) == 40


BAD = [
    (["model.module=no_such_module:build"], "model.module='no_such_module:build': no module"),
    (["model.module=recording:nothing"], "has no function nothing"),
    (["model.module=recording:raises"], "raises(model.options) raised ValueError: width must be "
                                        "positive, got 0 (at "),
    (["model.module=recording:tiny", "model.options.returns=logits"],
     "its forward returned a tensor of shape (1, 16, 512); it must return the loss"),
    (["model.module=recording:tiny", "model.options.returns=dict"],
     "its forward returned dict without a loss"),
    (["model.module=recording:tiny", "data.module=recording:ragged"],
     "sample 63 differs from sample 0 in input_ids: ((15,), 'int64') (sample 0: ((16,), "),
    (["model.module=recording:tiny", "model.trainable=[lm_head.*]"],
     "model.trainable: lm_head.* match no parameter of the model; names look like embed.weight"),
    (["model.module=recording:scalar"], "parameter gain is a 0-dimensional tensor"),
]


@pytest.mark.parametrize("sets, message", BAD, ids=[
    "no-import", "no-function", "raises", "logits", "no-loss", "ragged", "glob", "scalar"])
def test_bad_input_is_refused_before_any_distributed_work(tmp_path, capsys, sets, message):
    """Each refused by `telepathy resume` in this process with exit 2, the key and the fix named,
    before a process group exists: the run directory stays empty."""
    import torch.distributed

    run_dir = tmp_path / "run"
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.arange(4096, dtype=np.uint16) % 512)
    base = [f"code_path=[{support.MODULES}]", "model.base_paths=null", "data.module=null",
            f"data.path={tokens}", "data.seq_len=16", "model.vocab_size=512"]
    if any(s.startswith("data.module=") for s in sets):
        base = [s for s in base if not s.startswith(("data.path", "data.module"))]
    rc = resume_main(["--config", BRIDGE_CONFIG, "--run-dir", str(run_dir),
                      *[a for s in [*base, *sets] for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err
    assert not torch.distributed.is_initialized()
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_the_planner_counts_the_module_on_the_meta_device_or_as_a_start_measured_it(
        bridge_toy, tmp_path):
    """The bridge's parameters (all, trained) counted without a weight read, as the engine
    counts them; a module that cannot be built on the meta device (from_pretrained refuses it
    there) planned from what a start of the run recorded in module-shape.json."""
    from telepathy.config import load_config
    from telepathy.plan.model import model_shape

    cfg = load_config(BRIDGE_CONFIG, support.bridge_sets(bridge_toy))
    shape = model_shape(cfg, count=True)
    model = support.bridge_module(bridge_toy, {})
    assert shape.total == sum(p.numel() for p in model.parameters())
    assert shape.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < shape.trainable < shape.total / 10

    eager = load_config(BRIDGE_CONFIG, support.bridge_sets(
        bridge_toy, None, f"code_path=[{support.ROOT / 'examples' / 'bridge'}, {support.MODULES}]",
        "model.module=recording:eager_bridge"))
    assert model_shape(eager, count=True, run_dir=tmp_path).total is None
    (tmp_path / "module-shape.json").write_text('{"parameters": 123456, "trainable": 789}')
    shape = model_shape(eager, count=True, run_dir=tmp_path)
    assert (shape.total, shape.trainable) == (123456, 789)
