from pathlib import Path

import pytest

from telepathy.config import Config, config_from_dict, load_config, trajectory_changes
from telepathy.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

TINY = "configs/tiny-cpu.yaml"


def test_tiny_config_loads_and_round_trips():
    cfg = load_config(TINY)
    assert cfg.model.arch == "llama" and cfg.checkpoint.keep >= 2
    assert config_from_dict(cfg.to_dict()) == cfg


def test_production_config_loads():
    cfg = load_config("configs/llama-1b-h100.yaml")
    assert cfg.model.dtype == "bfloat16" and cfg.slurm.gpus_per_node == 4


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown key train.stepz in train; valid keys: steps, global_batch"),
    ("bogus.x=1", "unknown key bogus in the top level; valid keys: model, data, train"),
    ("train.steps=ten", "train.steps='ten' has the wrong type: expected int"),
    ("train.lr=true", "train.lr=True has the wrong type: expected float"),
    ("checkpoint.keep=1", "checkpoint.keep=1 is invalid: keep at least 2"),
    ("model.num_kv_heads=3", "model.num_kv_heads=3 is invalid: must divide model.num_heads=4"),
    ("preemption.signals=[SIGTERN]", "preemption.signals='SIGTERN' is invalid: use signal names"),
    ("data.seq_len=4096", "data.seq_len=4096 is invalid: must be <= model.max_seq_len=128"),
    ("placement.micro_batch_sizes=4", "has the wrong type: expected list (e.g. [1, 2])"),
    ("train.steps", "is not of the form section.key=value"),
])
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=".*".join(map(__import__("re").escape, message.split("*")))):
        load_config(TINY, [override])


def test_overrides_are_typed_by_yaml():
    cfg = load_config(TINY, ["train.steps=700", "train.lr=1e-3", "data.path=/x/tokens.npy",
                             "placement.micro_batch_sizes=[2, 1]"])
    assert (cfg.train.steps, cfg.train.lr, cfg.data.path) == (700, 1e-3, "/x/tokens.npy")
    assert cfg.placement.micro_batch_sizes == [2, 1]


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass --config"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("section, key, value", [
    ("model", "hidden_size", 128), ("data", "seed", 9), ("train", "seed", 5),
    ("train", "global_batch", 16), ("train", "lr", 0.5), ("train", "steps", 1000),
])
def test_trajectory_changes_are_detected(section, key, value):
    base = Config().to_dict()
    changed = Config().to_dict()
    old = changed[section][key]
    changed[section][key] = value
    assert trajectory_changes(base, changed) == [f"{section}.{key}: {old!r} -> {value!r}"]


def test_checkpoint_and_placement_changes_do_not_break_resume():
    base = Config().to_dict()
    changed = Config().to_dict()
    changed["checkpoint"]["every_steps"] = 5
    changed["placement"]["micro_batch_sizes"] = [1]
    changed["train"]["log_every"] = 1
    assert trajectory_changes(base, changed) == []


def test_the_config_knows_the_hashes_the_checkpoints_know():
    from telepathy.checkpoint.hashing import HASHES
    from telepathy.config.schema import CHECKPOINT_HASHES
    assert CHECKPOINT_HASHES == HASHES
    with pytest.raises(ConfigError, match="checkpoint.hash='md5' is invalid: choose one of"):
        load_config(TINY, ["checkpoint.hash=md5"])


def test_an_arch_telepathy_cannot_build_is_refused_with_the_list_and_the_way_out():
    with pytest.raises(ConfigError, match="model.arch='bloom'.*gpt2, gpt_neox.*pretrained_path"):
        config_from_dict({"model": {"arch": "bloom"}})


def test_gpt2_and_gpt_neox_need_as_many_kv_heads_as_heads():
    with pytest.raises(ConfigError, match="gpt2 has no grouped-query attention"):
        config_from_dict({"model": {"arch": "gpt2", "num_heads": 4, "num_kv_heads": 2}})
    assert config_from_dict({"model": {"arch": "gpt_neox", "num_heads": 4,
                                       "num_kv_heads": 4}}).model.arch == "gpt_neox"


@pytest.mark.parametrize("key, value, match", [
    ("r", -1, "model.lora.r=-1"), ("alpha", 0, "model.lora.alpha=0"),
    ("dropout", 1.0, "model.lora.dropout=1.0"), ("target_modules", [], "name at least one"),
])
def test_bad_lora_settings_name_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model": {"lora": {key: value}}})


def test_lora_and_trainable_from_the_command_line():
    cfg = load_config(str(ROOT / "configs/tiny-cpu.yaml"),
                      ["model.lora.r=8", "model.trainable=[lm_head.*, 'model.norm.*']"])
    assert cfg.model.lora.r == 8 and cfg.model.trainable == ["lm_head.*", "model.norm.*"]
    with pytest.raises(ConfigError, match="model.trainable"):
        config_from_dict({"model": {"trainable": []}})


def test_a_config_saved_before_a_key_existed_resumes_as_its_default():
    saved = Config().to_dict()
    del saved["model"]["lora"], saved["model"]["trainable"]
    assert trajectory_changes(saved, Config().to_dict()) == []
    lora = Config().to_dict()
    lora["model"]["lora"]["r"] = 8
    assert trajectory_changes(saved, lora) == ["model.lora.r: 0 -> 8"]


def test_the_sequence_length_of_a_pretrained_model_is_checked_against_its_own_config():
    with pytest.raises(ConfigError, match="model.max_seq_len=256"):
        config_from_dict({"data": {"seq_len": 512}})
    cfg = config_from_dict({"data": {"seq_len": 512}, "model": {"pretrained_path": "/m"}})
    assert cfg.data.seq_len == 512  # telepathy.train.inputs checks it against /m/config.json
