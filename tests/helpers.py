"""Shared test helpers."""


import warnings
from pathlib import Path

import torch

from sakimi_next.config import Config


ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


def small_config(**overrides) -> Config:
    """A model small enough to test quickly on CPU; Qwen3-Next shapes otherwise."""
    base = dict(
        vocab_size=160, hidden_size=64, num_hidden_layers=4, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        max_position_embeddings=1024,
    )
    base.update(overrides)
    return Config(**base)


def hf_twin(model, attn_implementation: str = "eager"):
    """transformers.Qwen3NextForCausalLM with a copy of `model`'s weights."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hcfg = Qwen3NextConfig(**model.config.to_hf_dict())
        hcfg._attn_implementation = attn_implementation
        hf = Qwen3NextForCausalLM(hcfg).to(model.model.embed_tokens.weight.dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    allowed = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(missing) <= allowed, missing
    hf.eval()
    return hf
