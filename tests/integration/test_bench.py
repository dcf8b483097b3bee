"""The benchmarks' --smoke modes, as CI runs them: they run, and their JSON holds every figure.
(Speed goals are judged from the full benchmark runs, never asserted here.)"""

import json
import subprocess
import sys

import pytest

from tests.support import ROOT


def smoke(module: str) -> dict:
    done = subprocess.run([sys.executable, "-m", module, "--smoke"], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_checkpoint_benchmark_smoke():
    result, = smoke("bench.checkpoint")["results"]
    assert result["model"] == "tiny" and result["world_size"] == 1 and result["bytes"] > 0
    for key in ("disk_write_fsync_s", "disk_read_s", "torch_save_s", "deepspeed_save_s",
                "deepspeed_load_s", "telepathy_sync_save_s", "telepathy_async_stall_s",
                "telepathy_async_total_s", "telepathy_verify_s", "telepathy_load_s"):
        assert result["seconds"][key] > 0, key
    assert set(result["ratios"]) >= {"telepathy_save_vs_disk_limit", "async_stall_vs_sync_save",
                                     "verified_vs_unverified_load",
                                     "telepathy_sync_save_vs_deepspeed_save",
                                     "async_stall_vs_memcpy", "async_save_rss_extra_vs_rank_bytes"}
    assert result["hash"] == "xxh3_128" and result["seconds"]["memcpy_mapped_s"] > 0
    assert set(result["hash_GB_per_s_one_thread"]) == {"xxh3_128", "blake3", "sha256"}
    assert 0 < result["seconds"]["telepathy_sync_save_durable_s"] <= \
        result["seconds"]["telepathy_sync_save_s"]
    assert result["snapshot_buffers_bytes"] > 0
    assert result["throughput"]["every_steps"] == 50 and result["throughput"]["step_s"] > 0
    # every target reported, and each miss says why
    assert set(result["targets"]) == {"telepathy_save_vs_disk_limit", "verified_vs_unverified_load",
                                      "async_stall_vs_memcpy", "checkpoint_overhead_on_throughput"}
    for key, target in result["targets"].items():
        assert target["value"] == result["ratios"][key]
        assert target["met"] or " s " in target["why"], (key, target)


def test_resume_benchmark_smoke():
    result, = smoke("bench.resume")["results"]
    assert result["model"] == "tiny" and result["world_size"] == 1
    assert result["seconds"]["cold_start_s"] > 0 and result["seconds"]["resume_s"] > 0
    assert result["ratios"]["resume_vs_cold_start"] > 0
    assert "why" in result or result["ratios"]["resume_vs_cold_start"] <= 1.2


def test_memory_model_benchmark_smoke():
    rows = smoke("bench.memory_model")["rows"]
    assert [r["device"] for r in rows].count("h100 (recorded)") == 6
    cpu, = [r for r in rows if r["device"] == "cpu"]
    assert cpu["measured_gib"] > 0 and cpu["model_gib"] > 0


def test_export_benchmark_smoke():
    result, = smoke("bench.export")["results"]
    assert result["model"] == "tiny" and result["fp32_weight_bytes"] > 0 and result["shards"] > 1
    for program in ("telepathy_export", "plain_zero_to_fp32"):
        peaks = result["peaks"][program]
        assert peaks["rss"] > 0 and peaks["anon"] > 0 and peaks["seconds"] > 0


@pytest.mark.slurm
def test_chaos_benchmark_smoke(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.chaos", "--smoke", "--workdir",
                           str(tmp_path / "soak"), "--picture", str(tmp_path / "t.png")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    fault, = report["faults"]
    assert fault["kind"] == "rank_kill" and fault["recovered"] and fault["recover_s"] > 0
    assert report["summary"]["exact"] and report["summary"]["lost_runs"] == 0
    assert report["by_kind"]["rank_kill"]["count"] == 1
    assert (tmp_path / "t.png").stat().st_size > 10_000
