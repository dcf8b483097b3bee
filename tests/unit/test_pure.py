"""Unit tests of the pure modules: data order, placement, schedule, environment, paths."""
import json

import numpy as np
import pytest

from telepathy.config.schema import TrainConfig
from telepathy.core.errors import DataError
from telepathy.core.paths import checkpoint_name, checkpoint_step
from telepathy.data.stream import TokenStream, generate_corpus, rank_slice
from telepathy.engine.schedule import lr_factor
from telepathy.plan.placement import choose_layout
from telepathy.slurm.env import DistEnv, SlurmEnv, first_host


def stream(n_tokens=10_000, seq_len=16, seed=3):
    return TokenStream(np.arange(n_tokens) % 200, seq_len, seed, vocab_size=256)


def test_every_epoch_is_a_permutation_and_epochs_differ():
    s = stream()
    n = s.num_samples
    first, second = s.sample_ids(0, n), s.sample_ids(n, n)
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert not np.array_equal(first, second)


def test_sample_ids_depend_on_position_only():
    a, b = stream(), stream()
    whole = a.sample_ids(0, 1000)
    b.sample_ids(0, 7)  # a different access history
    assert np.array_equal(b.sample_ids(300, 700), whole[300:])


@pytest.mark.parametrize("global_batch", [8, 12, 24])
def test_a_step_reads_the_same_samples_at_every_world_size(global_batch):
    ids = stream().sample_ids(5 * global_batch, global_batch)
    for world in (1, 2, 3, 4):
        if global_batch % world:
            continue
        layout = choose_layout(global_batch, world, [4, 2, 1])
        assert world * layout.micro_batch * layout.accum == global_batch
        seen = [i for a in range(layout.accum) for r in range(world)
                for i in rank_slice(ids, a, r, world, layout.micro_batch)]
        assert sorted(seen) == sorted(ids)


def test_batches_are_windows_of_seq_len_plus_one():
    s = stream(seq_len=16)
    batch = s.batch(np.array([0, 2]))
    assert batch.shape == (2, 17)
    assert list(batch[1]) == [(32 + i) % 200 for i in range(17)]


def test_token_beyond_vocab_is_a_data_error():
    s = TokenStream(np.full(100, 300, dtype=np.uint16), 8, 0, vocab_size=256)
    with pytest.raises(DataError, match="token id 300 .* >= model.vocab_size=256"):
        s.batch(np.array([0]))


def test_synthetic_corpus_is_deterministic_and_in_vocab():
    a, b = generate_corpus(5000, 256, 7), generate_corpus(5000, 256, 7)
    assert np.array_equal(a, b) and a.max() < 256 and len(a) == 5000
    assert not np.array_equal(a, generate_corpus(5000, 256, 8))


def test_lr_warms_up_linearly_then_decays_to_min_lr():
    t = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_factor(0, t) == pytest.approx(0.1) and lr_factor(9, t) == pytest.approx(1.0)
    assert lr_factor(10, t) == pytest.approx(1.0)
    assert lr_factor(99, t) == pytest.approx(0.1, abs=1e-3)
    values = [lr_factor(s, t) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1, 0, "single")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "29500"},
     (1, 2, 1, "torchrun")),
    ({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "77",
      "SLURM_STEP_NODELIST": "gpu[07-09]"}, (3, 4, 3, "srun")),
    # a batch script (no srun step) is a single process even inside a job
    ({"SLURM_PROCID": "0", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "4"}, (0, 1, 0, "single")),
    # submitit: its SLURM ranks are srun's; its local executor's tasks have variables of their own
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77",
      "SLURM_STEP_NODELIST": "gpu07", "SUBMITIT_EXECUTOR": "slurm"}, (1, 2, 1, "submitit-slurm")),
    ({"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_LOCALID": "1",
      "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_EXECUTOR": "local", "MASTER_PORT": "29511"},
     (1, 2, 1, "submitit-local")),
])
def test_dist_env_reads_torchrun_then_srun_then_submitit_local_then_single(env, expected):
    d = DistEnv.from_mapping(env)
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == expected
    if d.launcher in ("srun", "submitit-slurm"):
        assert d.master_addr == "gpu07" and d.master_port == 20077 and d.job_id is None
    if d.launcher == "submitit-local":
        assert (d.master_addr, d.master_port, d.job_id) == ("127.0.0.1", 29511, "local-4242")


def test_slurm_env_fields():
    s = SlurmEnv.from_mapping({"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "2",
                               "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_PARTITION": "preemptible"})
    assert (s.job_id, s.restart_count, s.gpus_on_node, s.in_job) == ("12", 2, 4, True)
    assert not SlurmEnv.from_mapping({}).in_job


@pytest.mark.parametrize("nodelist, host", [("n1", "n1"), ("gpu[07-09,12]", "gpu07"),
                                            ("a[3],b[1-2]", "a3"), ("x-1,x-2", "x-1")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_checkpoint_names_round_trip():
    assert checkpoint_step(checkpoint_name(123)) == 123
    assert checkpoint_step("step_123") is None and checkpoint_step("rejected") is None


def test_the_monitor_leaves_a_host_sample_even_when_stopped_before_its_first_interval(tmp_path):
    from telepathy.watch.monitor import SystemMonitor
    path = tmp_path / "system-host.jsonl"
    monitor = SystemMonitor(path, tmp_path, interval_s=3600.0).start()
    monitor.stop()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    samples = [r for r in rows if "cpu_pct" in r]
    assert len(samples) == 1 and samples[0]["disk_free_gb"] > 0
