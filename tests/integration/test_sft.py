"""Instruction tuning on real DeepSpeed ZeRO-3 (CPU, gloo): the toy chats prepared with a real
ChatML template (the loss on the answers only), packed rows whose examples do not attend to each
other, LoRA on a tiny tied Llama, a validation loss every 4 steps and the best checkpoint kept.
SIGTERMs at random steps and during an evaluation, at world 1 and 2 and on one rank after two:
every training loss and every eval_loss of the resumed run equal to the uninterrupted run's, each
evaluation once in metrics.jsonl and in TensorBoard. The best checkpoint survives pruning and is
exported, and the export answers in the template. (Through SLURM: tests/slurm/test_slurm.py.)"""

import json
import subprocess

import numpy as np
import pytest
import torch

from telepathy.checkpoint.cli import main as checkpoint_main
from telepathy.core.jsonl import read_jsonl
from telepathy.core.paths import RunPaths
from telepathy.data.examples import ExampleStream
from telepathy.data.exfile import Examples
from telepathy.export.cli import main as export_main
from telepathy.train.steps import loss_sum
from tests import support
from tests.support import PACED, RNG, RTOL, SFT_CONFIG

CPU = torch.device("cpu")


def evals(run_dir):
    """Every evaluation row of metrics.jsonl, in the order written."""
    return [r for r in read_jsonl(RunPaths.at(run_dir).metrics) if "eval_loss" in r]


def eval_losses(run_dir):
    return {r["step"]: r["eval_loss"] for r in evals(run_dir)}


def packed_rows_against_one_by_one(model, sft_data, rows):
    """For the first `rows` rows of more than two examples: (the packed row's batch, its summed
    loss, its examples' losses summed one by one as the padded mode computes them); the model's
    weights sharpened first (the tiny bases attend almost uniformly)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    examples = Examples(sft_data["train"])
    packed = ExampleStream(examples, 128, seed=1, vocab_size=512)
    padded = ExampleStream(examples, 128, seed=1, vocab_size=512, packing=False, shuffle=False)
    chosen = [r for r in range(packed.rows_per_epoch) if len(packed.members(r)) > 2][:rows]
    assert len(chosen) == rows
    with torch.no_grad():
        for row in chosen:
            members = packed.members(row)
            assert packed.loss_tokens(np.array([row])) == sum(
                padded.loss_tokens(np.array([e])) for e in members)
            batch = packed.inputs(np.array([row]))
            yield batch, loss_sum(model, batch, CPU).item(), sum(
                loss_sum(model, padded.inputs(np.array([e])), CPU).item() for e in members)


def test_a_packed_row_has_the_loss_of_its_examples_run_one_by_one(sft_data):
    """Position ids restarting at each example keep the examples of a row apart (transformers'
    block-diagonal mask): the summed loss of a row equals its examples' losses one by one, as
    the padded mode computes them; without the position ids the row's examples see each other."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_data["base"]).eval()
    for batch, together, alone in packed_rows_against_one_by_one(model, sft_data, 4):
        assert together == pytest.approx(alone, rel=RTOL)
        with torch.no_grad():
            seeing = loss_sum(model, {k: v for k, v in batch.items() if k != "position_ids"},
                              CPU).item()
        assert abs(seeing - together) > 10 * RTOL * abs(together)  # the check can fail


def assert_each_evaluation_once_and_exact(run_dir, reference):
    steps = [r["step"] for r in evals(run_dir)]
    assert steps == sorted(set(steps)), f"an evaluation was logged twice: {steps}"
    assert eval_losses(run_dir) == eval_losses(reference)


def tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_sigterm_during_an_evaluation_and_at_a_random_step_resume_exactly(
        sft_data, sft_reference, tmp_path):
    """World 1, TensorBoard on: SIGTERM while step 8's evaluation runs (held there by a fault
    point), then at a random step; every loss and eval_loss equal to the uninterrupted run's,
    each evaluation once in metrics.jsonl and in TensorBoard."""
    reference = sft_reference(1)
    sets = support.sft_sets(sft_data, "track.tensorboard=true")
    run_dir = tmp_path / "run"
    held = {"TELEPATHY_FAULT": "step.start@*,sleep=0.1;eval.batch@8,sleep=4,times=1"}
    rc, _ = support.interrupt(run_dir, 8, 1, sets, held, SFT_CONFIG)
    assert rc == 75, support.log_text(run_dir)
    stopped, = support.events(run_dir, "eval_stopped")
    assert stopped["step"] == 8 and support.events(run_dir, "preempted")[-1]["step"] == 8
    assert 8 not in eval_losses(run_dir)

    rc, _ = support.interrupt(run_dir, RNG.randint(10, 18), 1, sets, PACED, SFT_CONFIG)
    assert rc == 75, support.log_text(run_dir)
    assert support.run(run_dir, 1, sets, config=SFT_CONFIG) == 0, support.log_text(run_dir)
    assert len(support.events(run_dir, "resume")) == 2
    support.assert_same_losses(run_dir, support.losses(reference))
    assert_each_evaluation_once_and_exact(run_dir, reference)
    assert sorted(eval_losses(run_dir)) == [4, 8, 12, 16, 20, 24]
    logged = tensorboard_scalars(run_dir, "eval/loss")
    assert [s for s, _ in logged] == [4, 8, 12, 16, 20, 24]
    assert all(v == pytest.approx(eval_losses(reference)[s], rel=1e-6) for s, v in logged)


def test_world_two_resumes_exactly_and_on_one_rank_within_rounding(sft_data, sft_reference,
                                                                    tmp_path, capsys):
    """World 2 (LoRA on a tiny Llama): SIGTERM at a random step, resume bit for bit, the
    checkpoint holding the adapters alone; the same checkpoint resumed on one rank (2 -> 1):
    the adapters' fp32 weights and Adam moments carried bit for bit, losses and eval_loss within
    1e-5; the eval_loss of the uninterrupted runs at world 1 and 2 within 1e-5; the best
    exported as an adapter that peft loads."""
    from safetensors.torch import load_file

    from tests.integration.test_finetune import assert_adapters_alone

    ref2, ref1 = sft_reference(2), sft_reference(1)
    for step, loss in eval_losses(ref2).items():
        assert loss == pytest.approx(eval_losses(ref1)[step], rel=RTOL)
    sets = support.sft_sets(sft_data)
    run_dir, fewer, dumps = tmp_path / "run", tmp_path / "fewer", tmp_path / "dumps"
    rc, _ = support.interrupt(run_dir, RNG.randint(2, 18), 2, sets,
                              {**PACED, "TELEPATHY_DUMP_STATE": str(dumps)}, SFT_CONFIG)
    assert rc == 1 and support.events(run_dir, "preempted"), support.log_text(run_dir)
    subprocess.run(["cp", "-a", str(run_dir), str(fewer)], check=True)
    assert support.run(run_dir, 2, sets, config=SFT_CONFIG) == 0, support.log_text(run_dir)
    support.assert_same_losses(run_dir, support.losses(ref2))
    assert_each_evaluation_once_and_exact(run_dir, ref2)
    assert_adapters_alone(run_dir)

    assert support.run(fewer, 1, sets, {"TELEPATHY_DUMP_STATE": str(dumps)},
                       config=SFT_CONFIG) == 0, support.log_text(fewer)
    assert support.events(fewer, "world_size_changed")
    first = support.events(fewer, "preempted")[-1]["step"]
    saved = load_file(dumps / f"saved-step{first}-w2.safetensors")
    loaded = load_file(dumps / f"loaded-step{first}-w1.safetensors")
    assert sorted(saved) == sorted(loaded)
    assert any(k.endswith("/exp_avg_sq") and ".lora_B." in k for k in saved)
    assert [k for k in saved if not torch.equal(saved[k], loaded[k])] == []
    support.assert_close_losses(support.losses(fewer), support.losses(ref2), exact_until=first)
    got, want = eval_losses(fewer), eval_losses(ref2)
    assert sorted(got) == sorted(want)
    assert all(got[s] == pytest.approx(want[s], rel=RTOL) for s in want)

    best = min(want, key=want.get)
    out = tmp_path / "adapter"
    capsys.readouterr()
    assert export_main([str(run_dir), "--out", str(out), "--best", "--adapter", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == best
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_data["base"]), out)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_the_best_checkpoint_survives_pruning_and_its_export_answers_in_the_template(
        sft_data, tmp_path, capsys):
    """Evaluated on random tokens (training only makes that loss worse): the first evaluation
    stays the best while later, worse ones are pruned around it (keep 2); `checkpoint list`
    marks it; `export --best` writes it merged with the run's tokenizer; from_pretrained loads
    it and it answers a chat rendered with the template."""
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(rng.integers(0, 512, size=20_000).astype(np.uint16).tobytes())
    run_dir = tmp_path / "run"
    sets = [f"data.path={sft_data['train']}", f"eval.path={noise}", "eval.every_steps=3",
            "eval.max_examples=16", "train.steps=15", "checkpoint.every_steps=5",
            "checkpoint.keep=2", "train.warmup_steps=2"]
    assert support.run(run_dir, 1, sets, config=SFT_CONFIG) == 0, support.log_text(run_dir)
    losses = eval_losses(run_dir)
    assert sorted(losses) == [3, 6, 9, 12, 15]
    best = min(losses, key=losses.get)
    assert best < 12, losses  # later evaluations were worse
    assert [e["step"] for e in support.events(run_dir, "best_checkpoint")][-1] == best
    paths = RunPaths.at(run_dir)
    from telepathy.checkpoint.directory import complete_steps

    kept = complete_steps(paths.checkpoints)
    assert best in kept and kept[-2:] == [10, 15] and len(kept) == 3, kept
    capsys.readouterr()
    assert checkpoint_main(["list", str(run_dir), "--json"]) == 0
    assert [r["step"] for r in json.loads(capsys.readouterr().out) if r["best"]] == [best]

    out = tmp_path / "best"
    assert export_main([str(run_dir), "--out", str(out), "--best", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == best
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    answer = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert answer.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2",
                                  "gpt_neox"])
def test_every_arch_telepathy_builds_keeps_packed_examples_apart(sft_data, arch):
    """transformers finds the restarts of the position ids for every architecture telepathy
    builds (Llama: above): a packed row's loss is its examples' (within 1e-5)."""
    from transformers import AutoModelForCausalLM

    from telepathy.config import config_from_dict
    from telepathy.engine.build import model_config

    heads = 4 if arch in ("gpt2", "gpt_neox") else 2
    cfg = config_from_dict({"model": {"arch": arch, "vocab_size": 512, "max_seq_len": 128,
                                      "num_kv_heads": heads}, "data": {"seq_len": 128}})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(cfg, torch.float32)).eval()
    for _, together, alone in packed_rows_against_one_by_one(model, sft_data, 2):
        assert together == pytest.approx(alone, rel=RTOL)
