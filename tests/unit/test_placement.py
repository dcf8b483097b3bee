"""The placement planner and its ZeRO-3 memory model: tables of cases, impossible ones included."""

import dataclasses
import json
from pathlib import Path

import pytest

from telepathy.config import load_config
from telepathy.core.errors import ConfigError
from telepathy.plan.memory import OFFLOADS, REDUCE_BUCKET, GiB, ModelShape, zero3_memory
from telepathy.plan.placement import (
    Layout,
    PlanError,
    PlanRequest,
    choose_layout,
    nearest_divisible,
    plan,
    request_for,
    shape_of,
    smaller,
    step_time_s,
)

ROOT = Path(__file__).resolve().parents[2]
# Llama shapes (layers, hidden, intermediate, heads, kv heads), vocab 32000, seq 2048.
SHAPES = {
    "125M": ModelShape(12, 768, 2048, 12, 4, 32000, 2048, gradient_checkpointing=True),
    "336M": ModelShape(24, 1024, 2816, 16, 4, 32000, 2048, gradient_checkpointing=True),
    "1.1B": ModelShape(22, 2048, 5632, 32, 4, 32000, 2048, gradient_checkpointing=True),
    "7B": ModelShape(32, 4096, 11008, 32, 32, 32000, 4096, gradient_checkpointing=True),
}
MICROS = (16, 8, 4, 2, 1)


def request(shape, gpus, gb=256, mem=80.0, **kw):
    return PlanRequest(gpus, SHAPES[shape], gb, kw.pop("micros", MICROS), 2, mem, **kw)


def test_parameter_counts_match_transformers():
    """Counts of the models transformers built on the H100 (bench/results)."""
    assert SHAPES["125M"].parameters == 124_668_672
    assert SHAPES["336M"].parameters == 336_118_784
    assert SHAPES["1.1B"].parameters == 1_100_048_384


def test_memory_model_is_within_5_percent_of_the_h100_measurements():
    """Peaks measured with torch.cuda.max_memory_allocated on one H100, ZeRO-3 bf16, world 1."""
    runs = json.loads((ROOT / "bench/results/h100-2026-11-23.json").read_text())["runs"]
    errors = []
    for run in runs:
        shape = next(s for s in SHAPES.values() if s.parameters == run["parameters"])
        modelled = zero3_memory(shape, 1, run["micro_batch"], 2).peak_gib
        errors.append(modelled / run["gpu_mem_peak_gb"] - 1)
    assert len(errors) == 6 and all(-0.05 < e < 0.05 for e in errors), errors


@pytest.mark.parametrize("shape, gpus, mem, gb, expected", [
    # (shape, GPUs, GiB each, global batch) -> (micro, accum, offload)
    ("125M", 1, 80, 256, (16, 16, "none")),
    ("125M", 4, 80, 256, (16, 4, "none")),
    ("1.1B", 1, 80, 256, (16, 16, "none")),
    ("1.1B", 2, 80, 256, (16, 8, "none")),
    ("1.1B", 4, 80, 256, (16, 4, "none")),
    ("1.1B", 1, 40, 256, (8, 32, "none")),      # 16 no longer fits
    ("1.1B", 1, 24, 256, (8, 32, "optimizer")),  # optimizer states must leave the GPU
    ("1.1B", 4, 24, 256, (8, 8, "none")),       # sharding over 4 makes it fit again
    ("1.1B", 3, 80, 258, (2, 43, "none")),      # 3 GPUs: 258 = 3 x 86, largest micro 2
    ("7B", 1, 80, 64, (8, 8, "optimizer")),
    ("7B", 4, 80, 64, (8, 2, "none")),
    ("7B", 1, 16, 64, (2, 32, "optimizer+params")),
    ("125M", 2, 80, 2, (1, 1, "none")),
])
def test_plan_table(shape, gpus, mem, gb, expected):
    p = plan(request(shape, gpus, gb, mem))
    assert (p.layout.micro_batch, p.layout.accum, p.offload) == expected
    assert p.layout.world_size == gpus and p.global_batch == gb  # exactly the configured batch
    assert p.memory.peak <= mem * GiB * 0.9


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mem", [16, 24, 40, 80])
def test_more_gpus_never_need_more_offload_or_memory(shape, mem):
    levels = []
    for gpus in (1, 2, 4):
        try:
            p = plan(request(shape, gpus, 256, mem))
        except PlanError:
            levels.append(len(OFFLOADS))
            continue
        assert p.layout.world_size * p.layout.micro_batch * p.layout.accum == 256
        levels.append(OFFLOADS.index(p.offload))
    assert levels == sorted(levels, reverse=True)
    for offload in OFFLOADS:
        peaks = [zero3_memory(SHAPES[shape], w, 4, 2, offload).peak for w in (1, 2, 3, 4)]
        assert peaks == sorted(peaks, reverse=True)


def test_three_gpus_refuse_a_global_batch_that_does_not_divide():
    with pytest.raises(PlanError) as err:
        plan(request("1.1B", 3, 256))
    msg = str(err.value)
    assert "train.global_batch=256 does not divide over 3 GPUs (it divides over 1, 2, 4)" in msg
    assert "255 and 258" in msg and "placement.allow_nearest_global_batch=true" in msg


def test_three_gpus_take_the_nearest_global_batch_when_allowed():
    p = plan(request("1.1B", 3, 256, allow_nearest_global_batch=True))
    assert p.global_batch == 255 and p.layout == Layout(3, 1, 85)
    assert "global batch 256 -> 255" in p.notes[0]
    assert nearest_divisible(256, 3) == (255, 258) and nearest_divisible(2, 3) == (3, 3)


@pytest.mark.parametrize("req, match", [
    (request("7B", 1, 64, 8, micros=(8,)),
     r"nothing fits 1 GPU\(s\) of 8 GiB \(using 90%\): even micro-batch 8 with optimizer\+params "
     r"offload needs ~27.8 GiB per GPU"),
    (request("125M", 2, 6, micros=(4,)), "no size in placement.micro_batch_sizes=\\[4\\] divides "
                                         "the per-rank batch 3"),
    (request("125M", 0, 256), "a run needs at least 1 rank"),
])
def test_impossible_plans_say_what_would_work(req, match):
    with pytest.raises(PlanError, match=match):
        plan(req)


def test_offload_can_be_forbidden():
    with pytest.raises(PlanError, match="nothing fits"):
        plan(request("1.1B", 1, 256, 24, allow_offload=False))


def test_without_a_memory_limit_the_largest_dividing_micro_batch_wins():
    assert choose_layout(8, 2, [8, 4, 2, 1]) == Layout(2, 4, 1)
    assert choose_layout(256, 4, list(MICROS)) == Layout(4, 16, 4)
    assert choose_layout(12, 3, [8, 4, 2, 1]) == Layout(3, 4, 1)


@pytest.mark.parametrize("layout, micros, expected", [
    (Layout(1, 8, 1), (8, 4, 2, 1), Layout(1, 4, 2)),
    (Layout(2, 4, 2), (8, 4, 2, 1), Layout(2, 2, 4)),
    (Layout(1, 6, 1), (6, 3, 2, 1), Layout(1, 3, 2)),
    (Layout(1, 8, 1), (8, 1), Layout(1, 1, 8)),
    (Layout(1, 1, 8), (8, 4, 2, 1), None),
])
def test_after_an_oom_the_micro_batch_halves_and_the_global_batch_stays(layout, micros, expected):
    assert smaller(layout, micros) == expected
    if expected:
        assert expected.global_batch == layout.global_batch


def test_request_from_config_reads_shape_dtype_and_options(tmp_path):
    cfg = load_config(str(ROOT / "configs/llama-1b-h100.yaml"),
                      ["placement.allow_nearest_global_batch=true"])
    req = request_for(cfg, 4, 80.0)
    assert req.shape.parameters == 1_100_048_384 and req.dtype_bytes == 2
    assert req.micro_sizes == MICROS and req.allow_nearest_global_batch
    tiny = load_config(str(ROOT / "configs/tiny-cpu.yaml"))
    assert request_for(tiny, 1, None).dtype_bytes == 4  # auto on CPU: fp32
    hf = {"num_hidden_layers": 12, "hidden_size": 768, "intermediate_size": 2048,
          "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 32000}
    assert request_for(cfg, 1, 80.0, shape_of(cfg, hf)).shape.parameters == 124_668_672
    gpt2 = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_inner": None, "vocab_size": 256,
            "tie_word_embeddings": True}
    shape = shape_of(cfg, gpt2)
    assert (shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads,
            shape.vocab, shape.tied_embeddings) == (2, 64, 256, 4, 4, 256, True)
    with pytest.raises(ConfigError, match="none of num_hidden_layers, n_layer"):
        shape_of(cfg, {"hidden_size": 8, "num_attention_heads": 2, "vocab_size": 9})


def test_step_time_model_scales_with_gpus():
    one = step_time_s(SHAPES["1.1B"], 256 * 2048, 1, 989, 0.25, 0.9)
    four = step_time_s(SHAPES["1.1B"], 256 * 2048, 4, 989, 0.25, 0.9)
    assert one == pytest.approx(8 * 1_100_048_384 * 256 * 2048 / (989e12 * 0.25))
    assert four == pytest.approx(one / 4 / 0.81)


def test_the_planner_and_the_engine_agree_on_the_reduce_bucket():
    from telepathy.engine.build import DEEPSPEED_REDUCE_BUCKET, reduce_bucket_size

    assert DEEPSPEED_REDUCE_BUCKET == REDUCE_BUCKET
    assert reduce_bucket_size(123_712) == 123_712  # the tiny model: its own size, not 2 GB
    assert reduce_bucket_size(8_000_000_000) == REDUCE_BUCKET


def test_frozen_parameters_cost_their_weights_only():
    full = dataclasses.replace(SHAPES["1.1B"], total=1_000_000, trainable=None)
    lora = dataclasses.replace(full, trainable=10_000)
    a, b = zero3_memory(full, 2, 1, 2), zero3_memory(lora, 2, 1, 2)
    # bf16: every weight 2 bytes; gradient 2, master 4, moments 8 for the trained ones only.
    assert a.states == (2 + 2 + 12) * 500_000
    assert b.states == 2 * 500_000 + (2 + 12) * 5_000
    assert (a.step_extra, b.step_extra) == (8 * 500_000, 8 * 5_000)
    assert b.activations == a.activations and lora.parameters == 1_000_000


def test_two_nodes_of_four_gpus_are_one_world_of_eight():
    """A world past one node's 4 GPUs (2 nodes x 4): the same rules, the global batch fixed."""
    p = plan(request("1.1B", 8, 256))
    assert p.layout.world_size == 8 and p.global_batch == 256
    assert p.layout.micro_batch * p.layout.accum == 32
    with pytest.raises(PlanError, match="does not divide over 6 GPUs \\(it divides over 1, 2, 4\\)"):
        plan(request("1.1B", 6, 256))


def test_plan_weighs_node_counts_and_prefers_fewer_gpus_then_fewer_nodes():
    """`telepathy plan --nodes 2`: 1-2 nodes x 1-4 GPUs; the soonest finish wins, and on a tie
    the fewest ranks, then the fewest nodes."""
    from telepathy.plan.cli import main, options
    from telepathy.plan.gpucount import Option, recommend

    cfg = load_config(ROOT / "configs" / "llama-1b-h100.yaml")
    opts = options(cfg, None, 80.0, max_nodes=2)
    assert [(o.nodes, o.gpus) for o in opts] == [(n, g) for n in (1, 2) for g in (1, 2, 3, 4)]
    eight = next(o for o in opts if o.ranks == 8)
    assert eight.plan.layout.world_size == 8 and eight.plan.global_batch == 256
    assert eight.step_s < next(o for o in opts if (o.nodes, o.gpus) == (1, 4)).step_s
    # 2 x 2 and 1 x 4 are both four ranks: the same finish, one node wins
    waited = [dataclasses.replace(o, wait_s=0.0) for o in opts if o.plan is not None]
    four = [o for o in waited if o.ranks == 4]
    assert recommend(four, 1000) == next(o for o in four if o.nodes == 1)
    # the eight ranks of two nodes finish soonest when both start now; not after a long wait
    assert (recommend(waited, 1000).nodes, recommend(waited, 1000).gpus) == (2, 4)
    later = [dataclasses.replace(o, wait_s=1e6 if o.nodes == 2 else 0.0) for o in waited]
    assert (recommend(later, 1000).nodes, recommend(later, 1000).gpus) == (1, 4)
    assert Option(2, None, nodes=3).name == "3 nodes x 2 GPU(s)"
    assert main(["--config", str(ROOT / "configs" / "llama-1b-h100.yaml"), "--nodes", "0"]) == 2
