"""Fine-tuning on real DeepSpeed ZeRO-3 (CPU, gloo): LoRA through peft and frozen parameters on
locally saved GPT-2 and Llama models, exact resume at world 1 and 2, checkpoints that hold only
what trains (read with DeepSpeed's own zero_to_fp32), a changed base refused, a resume on fewer
ranks, and the exports read back with transformers and peft themselves."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from telepathy.core.paths import RunPaths
from telepathy.export import hf
from tests import support
from tests.support import LORA_CONFIG, PACED, RNG, assert_preempted, assert_same_losses


def newest_checkpoint(run_dir):
    from telepathy.checkpoint.directory import complete_steps

    paths = RunPaths.at(run_dir)
    return paths.checkpoint(complete_steps(paths.checkpoints)[-1])


# Llama LoRA resumes at world 1 through SLURM (tests/slurm/test_slurm.py, scancel -s TERM) and
# at world 2, then on one rank with its fp32 adapters and Adam moments compared
# (tests/integration/test_sft.py).
@pytest.mark.parametrize("arch, world", [("gpt2", 1), ("gpt2", 2)])
def test_lora_resumes_bit_for_bit_after_sigterm(arch, world, base_model, lora_reference,
                                                 tmp_path):
    """SIGTERM at a random step, resume: every later loss equal to the uninterrupted run's; the
    checkpoint holds the adapters alone."""
    ref = support.losses(lora_reference(arch, world))
    run_dir = tmp_path / "run"
    sets = support.lora_sets(base_model(arch))
    rc, _ = support.interrupt(run_dir, RNG.randint(2, 10), world, sets, PACED, LORA_CONFIG)
    assert_preempted(rc, world, run_dir)
    assert support.run(run_dir, world, sets, config=LORA_CONFIG) == 0, support.log_text(run_dir)
    assert support.events(run_dir, "resume"), "the second start did not resume"
    assert_same_losses(run_dir, ref)
    assert_adapters_alone(run_dir)


def assert_adapters_alone(run_dir):
    """The checkpoint holds the adapters alone: DeepSpeed's own consolidation finds nothing
    else, and the base's checksums are recorded."""
    weights = support.consolidated(newest_checkpoint(run_dir))
    assert weights and all(".lora_A." in n or ".lora_B." in n for n in weights), sorted(weights)
    assert (run_dir / "base-model.json").is_file()


def snapshot(run_dir):
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns,
                                          hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_frozen_parameters_stay_pretrained_and_a_changed_base_is_refused(tmp_path):
    """A model.trainable run on a Llama whose head is tied to its embedding, the embedding
    trained: the frozen parameters end bit for bit pretrained, the trained ones changed, the
    checkpoint holds only those. The merged export is the base with the trained weights, as many
    tensors and bytes as the base, the head still the trained embedding. Then one bit of the
    base flips: the next start is refused with exit 2 and the file's name, and no file of the
    run directory changes."""
    from transformers import AutoModelForCausalLM

    base = support.save_base(tmp_path / "base", "llama", tied=True)
    run_dir, dumps = tmp_path / "run", tmp_path / "dumps"
    trainable = "model.trainable=[model.layers.1.mlp.*, model.embed_tokens.weight]"
    sets = support.lora_sets(base, "model.lora.r=0", trainable, "train.steps=6")
    rc = support.run(run_dir, 1, sets, env={"TELEPATHY_DUMP_STATE": str(dumps)},
                     config=LORA_CONFIG)
    assert rc == 0, support.log_text(run_dir)
    state = load_file(dumps / "saved-step6-w1.safetensors")
    pretrained = load_file(base / "model.safetensors")
    trained = {k.rsplit("/", 1)[0] for k in state if k.endswith("/fp32")}
    frozen = {k.rsplit("/", 1)[0] for k in state if k.endswith("/frozen")}
    assert trained == {"model.embed_tokens.weight", *(f"model.layers.1.mlp.{m}_proj.weight"
                                                      for m in ("gate", "up", "down"))}
    assert frozen == set(pretrained) - trained and frozen
    assert [n for n in frozen if not torch.equal(state[f"{n}/frozen"], pretrained[n])] == []
    assert [n for n in trained if torch.equal(state[f"{n}/fp32"], pretrained[n])] == []
    # What a checkpoint holds: the trained parameters, nothing of the frozen base (the tied head
    # under its own name too: DeepSpeed's shared_params).
    assert set(support.consolidated(newest_checkpoint(run_dir))) == trained | {"lm_head.weight"}

    merged = tmp_path / "merged"
    exported = hf.export(run_dir, merged)
    assert (exported.tensors, exported.bytes) == support.safetensors_size(merged) \
        == support.safetensors_size(base)  # the tied head written once, as the base has it
    model = AutoModelForCausalLM.from_pretrained(merged, local_files_only=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    got = model.state_dict()
    want = {**{n: state[f"{n}/frozen"] for n in frozen}, **{n: state[f"{n}/fp32"] for n in trained}}
    assert [n for n in want if not torch.equal(got[n], want[n])] == []

    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-RNG.randrange(1, 4096)] ^= 0x10  # one bit of a weight; same size, same header
    weights.write_bytes(bytes(data))
    before = snapshot(run_dir)
    rc = support.run(run_dir, 1, sets, config=LORA_CONFIG)
    assert rc == 2
    log = support.log_text(run_dir)
    assert "model.safetensors (content differs)" in log and "changed since this run" in log
    assert snapshot(run_dir) == before


def test_lora_exports_merged_and_as_an_adapter_that_transformers_and_peft_load(
        base_model, lora_reference, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, base = lora_reference("gpt2", 1), base_model("gpt2")
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    exported = hf.export(run_dir, merged_dir)
    exported_adapter = hf.export(run_dir, adapter_dir, adapter_only=True)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in adapter_dir.iterdir()}
    assert (exported_adapter.tensors, exported_adapter.bytes) == support.safetensors_size(
        adapter_dir)
    # GPT-2's head is tied to its embedding: written once, as save_pretrained wrote the base.
    assert (exported.tensors, exported.bytes) == support.safetensors_size(merged_dir) \
        == support.safetensors_size(base)

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True).eval()
    assert type(merged).__name__ == "GPT2LMHeadModel"  # plain transformers, no peft inside
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, local_files_only=True), adapter_dir).eval()

    # The adapter holds what DeepSpeed's zero_to_fp32 finds in the run's last checkpoint.
    trained = support.consolidated(newest_checkpoint(run_dir))
    adapters = {n.replace(".default", ""): p for n, p in peft_model.named_parameters()
                if ".lora_" in n}
    assert sorted(adapters) == sorted(n.replace(".default", "") for n in trained)
    assert all(torch.equal(adapters[n.replace(".default", "")], w) for n, w in trained.items())

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged_logits = peft_model(input_ids=ids).logits
        reference = peft_model.merge_and_unload().state_dict()
        got = merged.state_dict()
        assert sorted(got) == sorted(reference)
        worst = max((got[k] - reference[k]).abs().max().item() for k in reference)
        assert worst <= 1e-6, worst
        assert torch.allclose(merged(input_ids=ids).logits, unmerged_logits, atol=1e-5)
        out = merged.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
