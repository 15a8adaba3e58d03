"""Cached forward calls equal one full forward: token by token, in chunks, and with left padding."""

import pytest
import torch

from sakimi_next.config import preset
from sakimi_next.model import Qwen3NextForCausalLM

from .helpers import small_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Qwen3NextForCausalLM(small_config()).eval()
    with torch.no_grad():  # move norms and gates off their initial values so nothing is trivially equal
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return m


@pytest.mark.parametrize("T", [1, 2, 5, 63, 64, 65, 130])
@torch.no_grad()
def test_token_by_token_equals_full_forward(model, T):
    x = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    full = model(x).logits
    cache = model.new_cache(2, capacity=8)  # small capacity: the KV cache must grow
    steps = torch.cat([model(x[:, t:t + 1], cache=cache).logits for t in range(T)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split", [1, 17, 63, 64, 65, 100, 199])
@torch.no_grad()
def test_prefill_then_forward_equals_whole(model, split):
    x = torch.randint(0, model.config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(split))
    full = model(x).logits
    cache = model.new_cache(2)
    a = model(x[:, :split], cache=cache).logits
    b = model(x[:, split:], cache=cache).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-4, atol=1e-4)
    assert cache.length == 200


@torch.no_grad()
def test_three_segments_and_single_tokens(model):
    x = torch.randint(0, model.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(7))
    full = model(x).logits
    cache = model.new_cache(1)
    parts = [model(x[:, :40], cache=cache).logits]
    for t in range(40, 45):
        parts.append(model(x[:, t:t + 1], cache=cache).logits)
    parts.append(model(x[:, 45:150], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_left_padded_batch_equals_each_sequence_alone(model):
    gen = torch.Generator().manual_seed(3)
    lengths = [70, 33, 5]
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    L = max(lengths)
    pad = 0
    ids = torch.full((3, L), pad)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = s
        mask[i, L - len(s):] = 1
    batched = model(ids, attention_mask=mask).logits
    for i, s in enumerate(seqs):
        alone = model(s[None]).logits[0]
        torch.testing.assert_close(batched[i, L - len(s):], alone, rtol=1e-4, atol=1e-4)

    # and the same through a cache: padded prefill, then decoding steps for the whole batch
    cache = model.new_cache(3)
    model(ids, attention_mask=mask, cache=cache)
    nxt = torch.randint(0, model.config.vocab_size, (3, 4), generator=gen)
    steps = torch.cat([model(nxt[:, t:t + 1], cache=cache).logits for t in range(4)], 1)
    for i, s in enumerate(seqs):
        alone = model(torch.cat([s, nxt[i]])[None]).logits[0, -4:]
        torch.testing.assert_close(steps[i], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny_5m", "tiny_10m"])
@torch.no_grad()
def test_presets_decode_equals_full(name):
    torch.manual_seed(0)
    m = Qwen3NextForCausalLM(preset(name)).eval()
    x = torch.randint(0, m.config.vocab_size, (1, 70))
    full = m(x).logits
    cache = m.new_cache(1)
    a = m(x[:, :66], cache=cache).logits
    rest = [m(x[:, t:t + 1], cache=cache).logits for t in range(66, 70)]
    torch.testing.assert_close(torch.cat([a, *rest], 1), full, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_recurrent_kernel_with_cache(model):
    x = torch.randint(0, model.config.vocab_size, (2, 90), generator=torch.Generator().manual_seed(5))
    full = model(x).logits
    model.set_kernel("recurrent")
    try:
        cache = model.new_cache(2)
        a = model(x[:, :50], cache=cache).logits
        b = model(x[:, 50:], cache=cache).logits
    finally:
        model.set_kernel("chunk")
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_cache_state_dict_round_trip(model):
    x = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(9))
    cache = model.new_cache(2)
    model(x[:, :20], cache=cache)
    saved = cache.state_dict()
    a = model(x[:, 20:], cache=cache).logits
    cache.load_state_dict(saved)
    b = model(x[:, 20:], cache=cache).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_decode_step_equals_forward(model):
    """The lean one-token path gives the logits and the cache of the general forward."""
    x = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(11))
    a, b = model.new_cache(2), model.new_cache(2)
    model(x[:, :30], cache=a)
    model(x[:, :30], cache=b)
    with torch.inference_mode():
        for t in range(30, 40):
            ref = model(x[:, t:t + 1], cache=a).logits[:, 0]
            torch.testing.assert_close(model.decode_step(x[:, t], b), ref, rtol=1e-5, atol=1e-5)
    for la, lb in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(la[1], lb[1], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_packed_documents_do_not_see_each_other(model):
    """With doc_starts, each document in a packed row gets the logits it gets alone (RoPE is relative,
    so its offset in the row does not matter)."""
    gen = torch.Generator().manual_seed(12)
    lengths = [40, 3, 70, 30]
    docs = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    row = torch.cat(docs)[None]
    starts = torch.zeros_like(row, dtype=torch.bool)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    starts[0, offsets[1:-1]] = True
    packed = model(row, doc_starts=starts).logits[0]
    for doc, a in zip(docs, offsets[:-1].tolist()):
        torch.testing.assert_close(packed[a:a + len(doc)], model(doc[None]).logits[0], rtol=1e-4, atol=1e-4)
    # without doc_starts the later documents do see the earlier ones
    assert (model(row).logits[0, offsets[1]:offsets[2]] - packed[offsets[1]:offsets[2]]).abs().max() > 1e-3
