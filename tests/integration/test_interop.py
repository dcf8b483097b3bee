"""Nothing trapped: DeepSpeed's own tools read every checkpoint telepathy writes, and what
`telepathy export` writes is an ordinary Hugging Face model.

Checked with the other tools themselves: DeepSpeed's `zero_to_fp32`
(`get_fp32_state_dict_from_zero_checkpoint`), its `ds_to_universal` converter, and
`transformers`' `from_pretrained`; never with telepathy's own reader.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from telepathy.checkpoint import directory
from telepathy.checkpoint.writer import snapshot
from telepathy.core.errors import CheckpointError, TelepathyError
from telepathy.core.paths import RunPaths
from telepathy.export import hf
from tests import support
from tests.support import MODEL, damage


def zero_to_fp32(ckpt):
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def exported_tensors(out):
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_a_snapshot_keeps_the_types_deepspeeds_tools_rely_on():
    from collections import OrderedDict, namedtuple

    Pair = namedtuple("Pair", "a b")
    state = {"param_shapes": [OrderedDict(w=torch.Size([3, 4]))], "pair": Pair(1, torch.ones(2)),
             "plain": (1, 2)}
    copy = snapshot(state, None)
    assert type(copy["param_shapes"][0]) is OrderedDict
    assert type(copy["param_shapes"][0]["w"]) is torch.Size and copy["param_shapes"][0]["w"].numel() == 12
    assert type(copy["pair"]) is Pair and torch.equal(copy["pair"].b, torch.ones(2))
    assert type(copy["plain"]) is tuple


def same(a, b, where="") -> list[str]:
    """Where two deserialised checkpoint states differ: tensors bit for bit (dtype and shape
    too), containers key for key and in order, objects (a loss scaler, DeepSpeed's config) by
    their attributes."""
    if type(a) is not type(b):
        return [f"{where}: {type(a).__name__} against {type(b).__name__}"]
    if isinstance(a, torch.Tensor):
        equal = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if equal else [f"{where}: tensors differ"]
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{where}: keys {list(a)} against {list(b)}"]
        return [d for k in a for d in same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{where}[{i}]")]
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return same(vars(a), vars(b), where)
    return [] if a == b else [f"{where}: {a!r} against {b!r}"]


def test_the_collective_free_save_writes_what_deepspeeds_own_save_writes(tmp_path):
    """telepathy skips the collectives DeepSpeed's save_checkpoint wraps its ZeRO-3 walk in
    (adapter.save_checkpoint): at world 2, with frozen parameters excluded and not, every file
    it writes deserialises to what DeepSpeed's own save writes from the same state."""
    worker = support.ROOT / "tests" / "modules" / "same_files.py"
    done = subprocess.run([sys.executable, "-c", support.TORCHRUN, "--standalone",
                           "--nproc_per_node=2", str(worker), str(tmp_path)],
                          capture_output=True, text=True, cwd=support.ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert report["local-False"] and report["local-True"], report  # the path was taken
        assert report["persistent"] > 0 and report["restored"], report
    for exclude in (False, True):
        ours, theirs = tmp_path / f"telepathy-{exclude}" / "t", tmp_path / f"deepspeed-{exclude}" / "t"
        names = sorted(p.name for p in theirs.iterdir())
        assert sorted(p.name for p in ours.iterdir()) == names
        assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in names
        for name in names:
            if name.endswith(".pt"):
                differ = same(torch.load(ours / name, weights_only=False),
                              torch.load(theirs / name, weights_only=False))
                assert not differ, f"{exclude} {name}: {differ[:5]}"
            else:  # DeepSpeed's recovery scripts
                assert (ours / name).read_bytes() == (theirs / name).read_bytes()
    # exclusion did something: the frozen parameters' fragments are only in the full save
    full = torch.load(tmp_path / "telepathy-False/t/zero_pp_rank_0_mp_rank_00_model_states.pt",
                      weights_only=False)
    assert full["frozen_param_fragments"]


@pytest.mark.parametrize("world", [1, 2])
def test_deepspeeds_tools_read_every_checkpoint_and_export_equals_them(world, reference_run,
                                                                        tmp_path):
    """Every checkpoint of the reference runs: 20 and 40 saved in the background (snapshot
    copies), 60 the final save, synchronous (host tensors written from where they are)."""
    run_dir = reference_run(world)
    steps = directory.complete_steps(RunPaths.at(run_dir).checkpoints)
    assert len(steps) >= 2
    for step in steps:
        ckpt = RunPaths.at(run_dir).checkpoint(step)
        state = zero_to_fp32(ckpt)
        out = tmp_path / f"export-{step}"
        result = hf.export(run_dir, out, step=step, shard_bytes=200_000)
        assert result.world_size == world and result.step == step
        exported = exported_tensors(out)
        assert sorted(exported) == sorted(state) and len(state) == 21
        differ = [k for k in state if not torch.equal(exported[k], state[k])]
        assert not differ, f"export differs from zero_to_fp32 at {differ[:5]}"
    # DeepSpeed's converter for another world size, on the newest checkpoint.
    universal = tmp_path / "universal"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(ckpt), "--output_folder", str(universal), "--num_extract_workers", "1",
                    "--num_merge_workers", "1"], check=True, capture_output=True, timeout=300)
    for name, tensor in state.items():
        converted = torch.load(universal / "zero" / name / "fp32.pt", weights_only=False)
        assert torch.equal(converted.flatten(), tensor.flatten()), name  # some are stored flat


def test_an_export_of_a_world_2_run_loads_with_from_pretrained_and_generates(reference_run, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = reference_run(2)
    out = tmp_path / "model"
    done = subprocess.run([sys.executable, "-m", "telepathy", "export", str(run_dir), "--out",
                           str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    newest = directory.complete_steps(RunPaths.at(run_dir).checkpoints)[-1]
    assert result["step"] == newest and result["world_size"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(result["files"]) == [
        "config.json", "generation_config.json", "model.safetensors", "telepathy-export.json"]
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    state = zero_to_fp32(RunPaths.at(run_dir).checkpoint(newest))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state) and len(loaded) == len(state)
    tokens = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 7)


def test_export_in_bfloat16_casts_every_tensor(reference_run, tmp_path):
    run_dir = reference_run(1)
    hf.export(run_dir, tmp_path / "bf16", dtype="bfloat16")
    tensors = exported_tensors(tmp_path / "bf16")
    state = zero_to_fp32(RunPaths.at(run_dir).checkpoint(
        directory.complete_steps(RunPaths.at(run_dir).checkpoints)[-1]))
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, state[k].bfloat16())
               for k, t in tensors.items())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_refuses_what_it_cannot_trust_and_leaves_no_directory(preempted_run, copy_of,
                                                                     tmp_path, monkeypatch):
    run_dir = copy_of(preempted_run)
    paths = RunPaths.at(run_dir)
    steps = directory.complete_steps(paths.checkpoints)
    out = tmp_path / "model"
    damage(paths.checkpoint(steps[-1]) / MODEL, "flip")
    with pytest.raises(CheckpointError, match=f"{paths.checkpoint(steps[-1]).name} does not verify.*{MODEL}"):
        hf.export(run_dir, out, step=steps[-1])
    assert hf.export(run_dir, out).step == steps[-2]  # the newest that verifies
    with pytest.raises(TelepathyError, match="already exists"):
        hf.export(run_dir, out)
    with pytest.raises(TelepathyError, match="inside the run directory"):
        hf.export(run_dir, run_dir / "model")
    with pytest.raises(CheckpointError, match=f"--step 7: no complete checkpoint.*{steps[-2]}"):
        hf.export(run_dir, tmp_path / "other", step=7)

    # A running job prunes the checkpoint while it is exported: a clear error, nothing written.
    real = hf.adapter.fp32_weights

    def pruned_meanwhile(ckpt, lazy=True):
        shutil.rmtree(ckpt)
        return real(ckpt, lazy)

    monkeypatch.setattr(hf.adapter, "fp32_weights", pruned_meanwhile)
    with pytest.raises(CheckpointError, match="went away while it was exported"):
        hf.export(run_dir, tmp_path / "pruned")
    assert not (tmp_path / "pruned").exists() and not list(tmp_path.glob(".pruned*"))


def test_a_run_started_from_an_export_has_the_exported_weights_loss_at_its_first_step(
        reference_run, tmp_path):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from telepathy.config import load_config
    from telepathy.data.stream import TokenStream, open_tokens

    out = tmp_path / "model"
    hf.export(reference_run(1), out)
    run_dir = tmp_path / "from-export"
    rc = support.run(run_dir, 1, [f"model.pretrained_path={out}", "train.steps=2",
                                  "train.warmup_steps=1"])
    assert rc == 0, support.log_text(run_dir)
    first = support.losses(run_dir)[1]

    cfg = load_config(support.CONFIG, support.SETS)
    corpus, = RunPaths.at(run_dir).data.glob("*.npy")
    stream = TokenStream(open_tokens(corpus, cfg.data.dtype), cfg.data.seq_len, cfg.data.seed,
                         cfg.model.vocab_size)
    batch = torch.from_numpy(stream.batch(stream.sample_ids(0, cfg.train.global_batch)))
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    expected = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    assert abs(first - expected.item()) <= 1e-6 * abs(expected.item()), (first, expected.item())


def test_an_export_beside_a_live_run_leaves_its_losses_as_they_were(tmp_path):
    run_dir = tmp_path / "run"
    proc = support.start(run_dir, 1, ["train.steps=120"])
    try:
        exported = []
        while proc.poll() is None and len(exported) < 2:
            steps = directory.complete_steps(RunPaths.at(run_dir).checkpoints)
            if steps and (not exported or steps[-1] > exported[-1].step):
                try:
                    exported.append(hf.export(run_dir, tmp_path / f"m{len(exported)}"))
                except CheckpointError as exc:  # pruned under it: said clearly, then again
                    assert "went away while it was exported" in str(exc)
        assert support.finish(proc) == 0, support.log_text(run_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(exported) == 2 and exported[0].step < exported[1].step < 120
    reference_run = tmp_path / "uninterrupted"
    assert support.run(reference_run, 1, ["train.steps=120"]) == 0
    support.assert_same_losses(run_dir, support.losses(reference_run))
