"""Multi-token prediction: its loss trains; speculative decoding with it equals plain greedy decoding,
and leaves the cache exactly as plain decoding would after rejected drafts."""

import pytest
import torch

from sakimi_next.cache import AttentionCache
from sakimi_next.generate import generate, speculative_generate
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.optim import build_optimizer

from .helpers import small_config


def pattern_batch(gen, B=8, T=64, vocab=160):
    """Sequences that follow a rule most of the time (so MTP can learn it) with a little noise."""
    start = torch.randint(0, vocab, (B, 1), generator=gen)
    step = torch.randint(1, 4, (B, 1), generator=gen)
    x = (start + step * torch.arange(T + 1)) % vocab
    noise = torch.rand(B, T + 1, generator=gen) < 0.05
    return torch.where(noise, torch.randint(0, vocab, (B, T + 1), generator=gen), x)


@pytest.fixture(scope="module")
def trained():
    """A small model with an MTP head after 120 steps on the pattern; returns (model, mtp losses)."""
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(small_config(mtp_num_hidden_layers=1))
    opt = build_optimizer(model, 3e-3, 0.0, (0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(120):
        x = pattern_batch(gen)
        out = model(x[:, :-1], x[:, 1:], mtp_weight=0.3)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.mtp_loss.item())
    return model.eval(), losses


def test_mtp_loss_decreases(trained):
    _, losses = trained
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_mtp_weights_use_released_names(trained):
    model, _ = trained
    names = [k for k in model.state_dict() if k.startswith("mtp.")]
    for expected in ("mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight",
                     "mtp.norm.weight", "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.mlp.gate_proj.weight"):
        assert expected in names
    assert model.state_dict()["mtp.fc.weight"].shape == (64, 128)


def test_loss_includes_weighted_mtp_term(trained):
    model, _ = trained
    x = pattern_batch(torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = model(x[:, :-1], x[:, 1:])
        both = model(x[:, :-1], x[:, 1:], mtp_weight=0.3)
    assert plain.mtp_loss is None
    torch.testing.assert_close(both.loss, plain.loss + 0.3 * both.mtp_loss)


PROMPTS = [[5, 8, 11, 14], [100], [7, 9, 11, 13, 15, 17, 19, 21, 23], list(range(20, 90, 1))]


@pytest.mark.parametrize("draft_len", [1, 2, 3, 5])
def test_speculative_equals_greedy(trained, draft_len):
    model, _ = trained
    drafted = accepted = 0
    for prompt in PROMPTS:
        spec, stats = speculative_generate(model, prompt, 40, draft_len=draft_len)
        assert spec == generate(model, [prompt], 40)[0]
        drafted += stats.drafted
        accepted += stats.accepted
    assert 0 < accepted < drafted  # both acceptances and rejections were exercised


def test_speculative_stops_at_eos(trained):
    model, _ = trained
    free = generate(model, [[5, 8, 11]], 20)[0]
    eos = free[6]
    spec, _ = speculative_generate(model, [5, 8, 11], 20, draft_len=3, eos_id=eos)
    assert spec == free[: free.index(eos) + 1]


@torch.no_grad()
def test_cache_after_rejections_equals_plain_decode(trained):
    model, _ = trained
    prompt = [3, 6, 9, 12, 15]
    cache = model.new_cache(1)
    tokens, stats = speculative_generate(model, prompt, 30, draft_len=4, cache=cache)
    assert stats.accepted < stats.drafted  # some drafts were rejected and rolled back
    plain = model.new_cache(1)
    seq = torch.tensor([prompt + tokens[:-1]])  # the last token has not been fed yet
    model(seq[:, :len(prompt)], cache=plain)
    for t in range(len(prompt), seq.shape[1]):
        model(seq[:, t:t + 1], cache=plain)
    assert cache.length == plain.length == seq.shape[1]
    for ours, ref in zip(cache.layers, plain.layers):
        if isinstance(ours, AttentionCache):
            for a, b in ((ours.keys, ref.keys), (ours.values, ref.values)):
                torch.testing.assert_close(a[:, :, :cache.length], b[:, :, :plain.length], rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(ours.recurrent_state, ref.recurrent_state, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.conv_window, ref.conv_window, rtol=1e-4, atol=1e-5)


def test_model_without_mtp_is_refused():
    from sakimi_next.util import UserError

    model = Qwen3NextForCausalLM(small_config())
    with pytest.raises(UserError, match="no MTP block"):
        speculative_generate(model, [1, 2], 5)
