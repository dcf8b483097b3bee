"""The benchmarks' --smoke modes, as CI runs them: they run, and their JSON holds every figure.
What is checked is the report's shape and sanity (every key there, every number finite and not
negative where it cannot be, a ratio only from a non-zero denominator, else None and why); the
figures themselves, and speed goals, are judged from the full benchmark runs, never here."""

import json
import math
import subprocess
import sys

import pytest

from tests.support import ROOT


def smoke(module: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", module, "--smoke", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


SIGNED = {"save_extra_s", "save_extra_s_per_round", "overhead", "error", "cpu_saved_s",
          "freeze_saved_s",
          "checkpoint_overhead_on_throughput", "dcp_checkpoint_overhead_on_throughput"}
"""Figures that may be below zero: a difference of two timings, a model's error."""


def numbers(obj, path=""):
    """(path, number) for every number in a report, however deep."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from numbers(value, f"{path}[{i}]")


def assert_sane(report):
    for path, value in numbers(report):
        assert math.isfinite(value), f"{path} = {value}"
        signed = {part.split("[")[0] for part in path.split(".")} & SIGNED
        assert value >= 0 or signed, f"{path} = {value} < 0"


def assert_ratios_measured_or_explained(result):
    for key, value in result["ratios"].items():
        assert value is not None or "not measured" in result["not_measured"][key], key


def test_checkpoint_benchmark_smoke():
    result, = smoke("bench.checkpoint")["results"]
    assert_sane(result)
    assert result["model"] == "tiny" and result["world_size"] == 1 and result["bytes"] > 0
    assert set(result["seconds"]) >= {
        "disk_write_fsync_s", "disk_read_s", "torch_save_s", "deepspeed_save_s",
        "deepspeed_load_s", "telepathy_sync_save_s", "telepathy_async_stall_s",
        "telepathy_async_total_s", "telepathy_verify_s", "telepathy_load_s", "memcpy_mapped_s",
        "telepathy_sync_save_durable_s"}
    assert set(result["ratios"]) >= {"telepathy_save_vs_disk_limit", "async_stall_vs_sync_save",
                                     "verified_vs_unverified_load",
                                     "telepathy_sync_save_vs_deepspeed_save",
                                     "async_stall_vs_memcpy", "async_save_rss_extra_vs_rank_bytes"}
    assert_ratios_measured_or_explained(result)
    assert result["hash"] == "xxh3_128"
    assert "dcp" not in result and "dcp_save_s" not in result["seconds"]  # only with --peer dcp
    assert set(result["hash_GB_per_s_one_thread"]) == {"xxh3_128", "blake3", "sha256"}
    # durable is a point inside the save call. The two come from different clocks (the
    # manager's wall clock inside, perf_counter around the call) at four significant digits:
    # equal within a millisecond is all that can be asserted of their order.
    assert result["seconds"]["telepathy_sync_save_durable_s"] <= \
        result["seconds"]["telepathy_sync_save_s"] + 1e-3
    assert result["snapshot_buffers_bytes"] > 0
    assert result["throughput"]["every_steps"] == 50 and len(result["throughput"]["plain_steps_s"]) == 12
    # every target reported, and each miss (or a ratio not measured) says why
    assert set(result["targets"]) == {"telepathy_save_vs_disk_limit", "verified_vs_unverified_load",
                                      "async_stall_vs_memcpy", "checkpoint_overhead_on_throughput"}
    for key, target in result["targets"].items():
        assert target["value"] == result["ratios"][key]
        assert target["met"] or target["why"], (key, target)


DCP_SECONDS = {"dcp_save_s", "dcp_async_stall_s", "dcp_async_total_s", "dcp_load_s",
               "dcp_async_stall_after_steps_s", "telepathy_async_stall_after_steps_s"}
DCP_RATIOS = {"telepathy_sync_save_vs_dcp", "telepathy_async_stall_vs_dcp",
              "telepathy_verified_load_vs_dcp"}


def test_checkpoint_benchmark_against_dcp_smoke():
    result, = smoke("bench.checkpoint", "--peer", "dcp")["results"]
    assert_sane(result)
    assert_ratios_measured_or_explained(result)
    assert set(result["seconds"]) >= DCP_SECONDS | {"telepathy_sync_save_durable_s",
                                                    "telepathy_async_stall_s"}
    assert set(result["ratios"]) >= DCP_RATIOS
    # DCP saved the rank state telepathy saves: the same tensors, give or take its metadata
    assert 0.9 < result["dcp"]["bytes"] / result["bytes"] < 1.2
    assert result["dcp"]["pinned_memory"] is False  # CPU: nothing to pin
    # DCP timed in the same throughput rounds as telepathy: 3 saves, steps between them
    assert len(result["dcp"]["throughput"]["save_stall_s"]) == 3
    assert "dcp_checkpoint_overhead_on_throughput" in result["ratios"]
    # the issue's targets reported beside issue 14's, each met or saying why not
    assert set(result["targets"]) >= DCP_RATIOS
    for key in DCP_RATIOS:
        target = result["targets"][key]
        assert target["value"] == result["ratios"][key] and target["target"] == "<= 1.0"
        assert target["met"] or target["why"], (key, target)


def test_train_step_benchmark_against_bare_deepspeed_smoke():
    report = smoke("bench.train_step", "--peer", "deepspeed")
    result, = report["results"]
    assert_sane(result)
    assert_ratios_measured_or_explained(result)
    assert report["peer"] == "deepspeed" and result["model"] == "tiny" and result["repeats"] == 1
    telepathy, = result["runs"]["telepathy"]
    bare, = result["runs"]["bare"]
    # Behaviour, not speed: both arms trained every step on the same batches from the same
    # weights (the same first loss) and saved at the interval and at the end.
    for run in (telepathy, bare):
        assert run["steps"] == result["steps"] == 20 and run["checkpoints"] >= 2
    assert telepathy["first_loss"] == pytest.approx(bare["first_loss"], rel=1e-5)
    assert set(result["ratios"]) == {"telepathy_vs_bare_tokens_per_s"}
    target = result["targets"]["telepathy_vs_bare_tokens_per_s"]
    assert target["value"] == result["ratios"]["telepathy_vs_bare_tokens_per_s"]
    assert target["met"] or target["why"]


def test_resume_benchmark_smoke():
    result, = smoke("bench.resume")["results"]
    assert_sane(result)
    assert result["model"] == "tiny" and result["world_size"] == 1
    assert set(result["seconds"]) == {"cold_start_s", "resume_s", "verify_s", "load_s"}
    assert set(result["ratios"]) == {"resume_vs_cold_start"}
    assert "why" in result or result["ratios"]["resume_vs_cold_start"] <= 1.2


def test_mirror_benchmark_smoke():
    report = smoke("bench.mirror")
    assert_sane(report)
    assert_ratios_measured_or_explained(report)
    assert len(report["mirror"]) == 1 and report["no_mirror"] == []  # the smoke: one run
    run = report["mirror"][0]
    assert run["uploads"] >= 1 and run["mirrored_steps"][0] == 60  # caught up by the exit
    assert report["complete_only_with_manifest"]


def test_startup_benchmark_smoke():
    report = smoke("bench.startup")
    assert_sane(report)
    assert report["rounds"] == 1
    for arm in ("collector_off", "collector_off_unfrozen", "collector_on"):
        assert len(report["runs"][arm]["cpu_s"]) == 1 and report["runs"][arm]["cpu_s"][0] >= 0
    for ratio in ("cpu_ratio_off_vs_on", "cpu_ratio_frozen_vs_unfrozen"):
        assert report[ratio] is not None or ratio in report["not_measured"]


def test_memory_model_benchmark_smoke():
    report = smoke("bench.memory_model")
    assert_sane(report)
    rows = report["rows"]
    assert [r["device"] for r in rows].count("h100 (recorded)") == 6
    cpu, = [r for r in rows if r["device"] == "cpu"]
    assert cpu["measured_gib"] > 0 and cpu["model_gib"] > 0  # bytes, not a duration


def test_export_benchmark_smoke():
    result, = smoke("bench.export")["results"]
    assert_sane(result)
    assert result["model"] == "tiny" and result["fp32_weight_bytes"] > 0 and result["shards"] > 1
    for program in ("telepathy_export", "plain_zero_to_fp32"):
        peaks = result["peaks"][program]
        assert peaks["rss"] > 0 and peaks["anon"] > 0 and "seconds" in peaks  # bytes: a process's


def test_finetune_benchmark_smoke():
    result, = smoke("bench.finetune")["results"]
    assert_sane(result)
    assert_ratios_measured_or_explained(result)
    assert result["model"] == "tiny" and result["world_size"] == 1
    full, lora = result["full"], result["lora"]
    for row in (full, lora):
        assert set(row) == {"checkpoint_bytes", "save_s", "resume_s", "verify_s", "load_s",
                            "steps_per_s", "parameters"}
    # Behaviour, not speed: the LoRA checkpoint leaves the frozen base out; LoRA adds weights.
    assert lora["checkpoint_bytes"] < full["checkpoint_bytes"]
    assert lora["parameters"] > full["parameters"] == result["base_parameters"]
    assert set(result["ratios"]) == {"checkpoint_bytes", "save_s", "resume_s", "steps_per_s"}


def test_sft_benchmark_smoke():
    report = smoke("bench.sft")
    assert_sane(report)
    assert_ratios_measured_or_explained(report)
    assert report["model"] == "tiny" and report["repeats"] == 1
    assert set(report["arms"]) == {"packed", "padded", "packed_eval"}
    for arm in report["arms"].values():
        assert set(arm) >= {"rows_per_epoch", "steps_to_epoch", "fill", "tokens_per_s",
                            "end_to_end", "step_time_s", "runs"}
        assert len(arm["runs"]) == 1 and 0 < arm["fill"] <= 1
    packed, padded, evaluated = (report["arms"][a] for a in ("packed", "padded", "packed_eval"))
    # Behaviour, not speed: packing fills rows that padding leaves half empty, so an epoch takes
    # fewer steps; padding gives every example a row of its own; the eval arm evaluated.
    assert packed["fill"] > padded["fill"] and packed["runs"][0]["run_fill"] > \
        padded["runs"][0]["run_fill"]
    assert packed["steps_to_epoch"] < padded["steps_to_epoch"]
    assert padded["rows_per_epoch"] == report["data"]["train_examples"]
    assert evaluated["runs"][0]["evaluations"] and "eval_cost" in evaluated["runs"][0]
    assert "evaluations" not in packed["runs"][0]
    assert set(report["ratios"]) == {"packed_vs_padded_tokens_per_s",
                                     "padded_vs_packed_steps_to_epoch", "eval_cost",
                                     "packed_eval_vs_packed_end_to_end"}
    target = report["targets"]["packed_vs_padded_tokens_per_s"]
    assert target["value"] == report["ratios"]["packed_vs_padded_tokens_per_s"]


@pytest.mark.slurm
def test_chaos_benchmark_smoke(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.chaos", "--smoke", "--workdir",
                           str(tmp_path / "soak"), "--picture", str(tmp_path / "t.png")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert_sane(report)
    fault, = report["faults"]
    assert fault["kind"] == "rank_kill" and fault["recovered"] and fault["recover_s"] is not None
    assert report["summary"]["exact"] and report["summary"]["lost_runs"] == 0
    assert report["by_kind"]["rank_kill"]["count"] == 1
    assert (tmp_path / "t.png").stat().st_size > 10_000
