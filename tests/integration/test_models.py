"""Which models load: every architecture telepathy builds from scratch, and pretrained
directories of other families (saved locally with save_pretrained, as a user's would be), as the
planner and the fine-tuning set-up see them. transformers and peft themselves, on the CPU."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from telepathy.config import load_config
from telepathy.config.schema import ARCHS, SHARED_KV_ARCHS
from telepathy.core.errors import ConfigError
from telepathy.engine import finetune
from telepathy.engine.build import model_config
from telepathy.plan.model import limits, model_shape
from tests import support


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_trains_a_step_and_gets_lora_on_its_attention(arch):
    kv = 4 if arch in SHARED_KV_ARCHS else 2
    cfg = load_config(support.CONFIG, [f"model.arch={arch}", f"model.num_kv_heads={kv}",
                                       "model.lora.r=4"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(cfg, torch.float32))
    assert model.config.model_type == arch and model.config.hidden_size == 64
    total, trainable = finetune.count(cfg, model.config)
    model = finetune.prepare(model, cfg)
    params = {id(p): p for p in model.parameters()}.values()
    assert (total, trainable) == (sum(p.numel() for p in params),
                                  sum(p.numel() for p in params if p.requires_grad))
    adapters = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
                if p.requires_grad}
    assert adapters and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert adapters == {t.rsplit(".", 1)[-1] for t in finetune.ATTENTION_PROJECTIONS[arch]}
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


PRETRAINED = {
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=300, max_position_embeddings=128),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                 max_position_embeddings=128, pad_token_id=0),
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
                   max_position_embeddings=128),
    "mixtral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                    max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=96),
}


@pytest.mark.parametrize("model_type", sorted(PRETRAINED))
def test_a_pretrained_model_of_any_family_is_planned_from_its_own_config(model_type, tmp_path):
    config = AutoConfig.for_model(model_type, **PRETRAINED[model_type])
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    cfg = load_config(support.CONFIG, [f"model.pretrained_path={tmp_path / 'm'}",
                                       "model.lora.r=8"])
    model = finetune.prepare(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), cfg)
    params = {id(p): p for p in model.parameters()}.values()
    shape = model_shape(cfg, count=True)
    assert shape.parameters == sum(p.numel() for p in params)
    assert shape.trained == sum(p.numel() for p in params if p.requires_grad) > 0
    assert (shape.hidden, shape.layers, shape.vocab) == (64, 2, 300)
    assert limits(cfg) == (300, 96 if model_type == "gpt2" else 128)


def test_globs_and_targets_that_name_nothing_are_clear_errors():
    cfg = load_config(support.CONFIG, ["model.trainable=[model.layer.*]"])
    model = AutoModelForCausalLM.from_config(model_config(cfg, torch.float32))
    with pytest.raises(ConfigError, match=r"model.trainable: model.layer.\* match no parameter.*"
                                          r"names look like model.embed_tokens.weight"):
        finetune.prepare(model, cfg)
    cfg = load_config(support.CONFIG, ["model.lora.r=4", "model.lora.target_modules=[qproj]"])
    with pytest.raises(ConfigError, match="qproj match no module.*q_proj"):
        finetune.prepare(model, cfg)
