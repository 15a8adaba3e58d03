"""Our model computes what transformers' Qwen3NextForCausalLM computes: logits, loss and every gradient."""

import pytest
import torch

from sakimi_next.config import preset
from sakimi_next.model import Qwen3NextForCausalLM

from .helpers import hf_twin, small_config

CONFIGS = {
    # Hv/Hk = 1, dk != dv, head_dim 32, untied
    "ratio1_dk_ne_dv_hd32_untied": small_config(
        linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
        head_dim=32, tie_word_embeddings=False),
    # Hv/Hk = 2, head_dim 64, tied, GQA 4:1
    "ratio2_hd64_tied": small_config(
        linear_num_key_heads=2, linear_num_value_heads=4, head_dim=64, num_attention_heads=4,
        num_key_value_heads=1),
    # Hv/Hk = 4, dk > dv, head_dim 128, untied, half-rotary, other theta
    "ratio4_hd128_untied": small_config(
        linear_num_key_heads=1, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=16,
        head_dim=128, num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
        partial_rotary_factor=0.5, rope_theta=1e6),
    # another layer pattern: attention first, 6 layers, conv width 3
    "pattern_AL_conv3": small_config(
        num_hidden_layers=6, layer_types=["full_attention", "linear_attention"] * 3, linear_conv_kernel_dim=3,
        linear_num_key_heads=2, linear_num_value_heads=2),
}


def compare(model, T, B=2, seed=0, grads=True):
    torch.manual_seed(seed)
    hf = hf_twin(model)
    x = torch.randint(0, model.config.vocab_size, (B, T))
    targets = torch.cat([x[:, 1:], torch.full((B, 1), -100)], dim=1)
    ours = model(x, targets)
    ref = hf(x, labels=x)
    assert (ours.logits - ref.logits).abs().max().item() <= 1e-4
    if T > 1:
        torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # transformers' own convention gives the same loss
            torch.testing.assert_close(model(x, labels=x).loss, ref.loss, rtol=1e-5, atol=1e-5)
    if not grads or T == 1:
        return
    ours.loss.backward()
    ref.loss.backward()
    hf_params = dict(hf.named_parameters())
    # A DeltaNet layer whose random A_log makes it forget almost everything at each step has a gradient
    # of ~1e-8 for dt_bias/A_log, which is float32 round-off for both implementations: relative errors
    # are measured against at least 1e-3 of the largest gradient in the model.
    floor = 1e-3 * max(p.grad.norm() for p in hf.parameters() if p.grad is not None)
    for name, p in model.named_parameters():
        g_ref = hf_params[name].grad
        assert p.grad is not None and g_ref is not None, name
        rel = (p.grad - g_ref).norm() / torch.maximum(g_ref.norm(), floor)
        assert rel.item() <= 1e-4, f"{name}: relative gradient error {rel.item():.2e}"


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_configs(name, T):
    torch.manual_seed(1)
    compare(Qwen3NextForCausalLM(CONFIGS[name]), T)


@pytest.mark.parametrize("name", ["tiny_5m", "tiny_10m", "small_50m"])
def test_parity_presets(name):
    torch.manual_seed(2)
    model = Qwen3NextForCausalLM(preset(name))
    compare(model, T=65 if name != "small_50m" else 40, B=1 if name == "small_50m" else 2)


def test_parity_untrained_norms_are_not_trivial():
    """Parity must also hold once norms and gates move away from their initial values."""
    torch.manual_seed(3)
    model = Qwen3NextForCausalLM(small_config(tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    compare(model, T=130)


def test_parity_left_padding():
    """Left-padded batch: logits of the real tokens equal transformers' with the same mask."""
    torch.manual_seed(4)
    model = Qwen3NextForCausalLM(small_config())
    hf = hf_twin(model)
    x = torch.randint(0, model.config.vocab_size, (2, 70))
    mask = torch.ones_like(x)
    mask[0, :9] = 0
    ours = model(x, attention_mask=mask).logits
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = hf(x, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max().item() <= 1e-4
