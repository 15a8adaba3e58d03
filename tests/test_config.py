"""Configuration, presets, parameter counts and bad input."""

import pytest
import torch

from sakimi_next.config import (CUSTOM, PRESETS, RECOMMENDED_PRESET, Config, ConfigError, Preset, nominal_size,
                                preset, training_defaults)
from sakimi_next.model import Qwen3NextForCausalLM, active_parameters, count_parameters, parameter_breakdown

EXACT = {"tiny_5m": 4_456_240, "tiny_10m": 9_425_888, "tiny_10m_moe": 31_480_800, "small_50m": 78_608_912}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    config = preset(name)
    total = sum(count_parameters(config).values())
    assert total == EXACT[name]
    assert sum(per * n for _, per, n in parameter_breakdown(config)) == total
    counted = total if name != "small_50m" else total - config.vocab_size * config.hidden_size
    if config.is_moe:  # an MoE preset's name counts the parameters active per token
        counted = active_parameters(config)
    assert 0.75 <= counted / nominal_size(name) <= 1.25


def test_small_50m_counts_non_embedding():
    config = preset("small_50m")
    assert sum(count_parameters(config).values()) - 50304 * 512 == 52_853_264


def test_preset_table_columns():
    for name, (V, L, H, nH, nKV) in {"tiny_5m": (2048, 4, 128, 4, 1), "tiny_10m": (4096, 8, 256, 4, 1),
                                     "small_50m": (50304, 12, 512, 8, 2)}.items():
        c = preset(name)
        assert (c.vocab_size, c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                c.num_key_value_heads) == (V, L, H, nH, nKV)
        assert c.layer_types == ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(L)]
        assert c.partial_rotary_factor == 0.25 and c.num_experts == 0


def test_tiny_10m_has_the_spec_shapes():
    shapes = {k: tuple(v.shape) for k, v in Qwen3NextForCausalLM(preset("tiny_10m")).state_dict().items()}
    assert shapes["model.embed_tokens.weight"] == (4096, 256)
    assert shapes["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (1536, 256)
    assert shapes["model.layers.0.linear_attn.in_proj_ba.weight"] == (16, 256)
    assert shapes["model.layers.0.linear_attn.conv1d.weight"] == (1024, 1, 4)
    assert shapes["model.layers.0.linear_attn.dt_bias"] == (8,)
    assert shapes["model.layers.0.linear_attn.A_log"] == (8,)
    assert shapes["model.layers.0.linear_attn.norm.weight"] == (64,)
    assert shapes["model.layers.0.linear_attn.out_proj.weight"] == (256, 512)
    assert shapes["model.layers.3.self_attn.q_proj.weight"] == (512, 256)
    assert shapes["model.layers.3.self_attn.k_proj.weight"] == (64, 256)
    assert shapes["model.layers.3.self_attn.o_proj.weight"] == (256, 256)
    assert shapes["model.layers.3.self_attn.q_norm.weight"] == (64,)
    assert shapes["model.norm.weight"] == (256,)
    assert "lm_head.weight" not in shapes  # tied


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    m = Qwen3NextForCausalLM(preset("tiny_10m"))
    sd = m.state_dict()
    assert (sd["model.layers.0.input_layernorm.weight"] == 0).all()
    assert (sd["model.layers.3.self_attn.q_norm.weight"] == 0).all()
    assert (sd["model.layers.0.linear_attn.norm.weight"] == 1).all()
    assert (sd["model.layers.0.linear_attn.dt_bias"] == 1).all()
    A = sd["model.layers.0.linear_attn.A_log"].exp()
    assert ((A >= 0.01) & (A <= 16)).all()
    std = sd["model.layers.0.mlp.gate_proj.weight"].std().item()
    assert abs(std - 0.02) < 0.001


@pytest.mark.parametrize("overrides, message", [
    (dict(num_attention_heads=6, num_key_value_heads=4),
     "num_attention_heads (6) must be divisible by num_key_value_heads (4)"),
    (dict(linear_num_key_heads=3, linear_num_value_heads=8),
     "linear_num_value_heads (8) must be divisible by linear_num_key_heads (3)"),
    (dict(hidden_size=0), "hidden_size (0) must be a positive integer"),
    (dict(layer_types=["linear_attention"] * 3), "layer_types has 3 entries but num_hidden_layers is 8"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor (1.5) must be in (0, 1]"),
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok (5) must be <= num_experts (4)"),
    (dict(eos_token_id=5000), "eos_token_id (5000) must be in 0..4095 (below vocab_size)"),
])
def test_validation_names_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        preset("tiny_10m", **overrides)
    assert str(e.value) == message


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of: "
                                          "tiny_5m, tiny_10m, tiny_10m_moe, small_50m"):
        preset("huge")


def test_hf_dict_round_trip():
    from transformers import Qwen3NextConfig

    for name in PRESETS:
        c = preset(name, eos_token_id=0, pad_token_id=1)
        assert Config.from_hf_dict(c.to_hf_dict()) == c
        hf = Qwen3NextConfig(**c.to_hf_dict())
        assert Config.from_hf_dict(hf.to_dict()) == c
        assert hf.layer_types == c.layer_types and hf.head_dim == c.head_dim


def test_from_hf_dict_refuses_other_models():
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        Config.from_hf_dict({"model_type": "llama"})


def test_out_of_range_token_ids():
    m = Qwen3NextForCausalLM(preset("tiny_5m"))
    with pytest.raises(ValueError, match=r"token id 2048 is outside the vocabulary \(0..2047\)"):
        m(torch.tensor([[1, 2048]]))
    with pytest.raises(ValueError, match="token id -1"):
        m(torch.tensor([[-1, 3]]))


def test_every_preset_holds_its_training_defaults():
    """One table: a preset without complete training defaults cannot be made, an unknown name is an error,
    and a model that is no preset (--init-from) takes the recommended preset's."""
    from sakimi_next.settings import Hyperparameters

    for name, p in PRESETS.items():
        assert training_defaults(name) is p.training
        assert all(getattr(p.training, k) is not None for k in vars(p.training) if k != "min_lr")
    assert training_defaults(CUSTOM) is training_defaults(None) is PRESETS[RECOMMENDED_PRESET].training
    with pytest.raises(ConfigError, match="unknown preset 'tiny_1m'"):
        training_defaults("tiny_1m")
    with pytest.raises(ConfigError, match="steps is unset"):
        Preset(model={}, training=Hyperparameters(learning_rate=1e-3))


def test_resolved_hyperparameters_are_the_given_ones_settled():
    """`ResolvedHyperparameters` has the fields of `Hyperparameters`, in its order (trainer_state.json keeps
    them so), and resolving leaves none unset."""
    from dataclasses import fields

    from sakimi_next.hyperparameters import ResolvedHyperparameters, resolve_hyperparameters
    from sakimi_next.settings import Hyperparameters

    assert [f.name for f in fields(ResolvedHyperparameters)] == [f.name for f in fields(Hyperparameters)]
    h = resolve_hyperparameters(Hyperparameters(learning_rate=4e-3, grad_clip=0.0), None, "tiny_5m")
    assert all(v is not None for v in vars(h).values())
    assert (h.min_lr, h.steps, h.max_grad_norm) == (4e-4, PRESETS["tiny_5m"].training.steps, float("inf"))
