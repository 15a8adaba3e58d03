"""The chunked gated delta rule, the conv paths and the decoding matmul against their plain references."""

import pytest
import torch
import torch.nn.functional as F

from sakimi_next.kernels import chunk_gated_delta_rule, recurrent_gated_delta_rule, recurrent_step
from sakimi_next.kernels.conv import causal_conv1d, causal_conv1d_step, conv_taps, update_window
from sakimi_next.kernels.linear import TRACED_ROWS_MAX, StepLinear, step_linear
from sakimi_next.kernels.naive import traced_recurrent_step


def make_inputs(B, T, Hk, H, K, V, gate, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=dtype)

    q = F.normalize(randn(B, T, Hk, K), dim=-1)
    k = F.normalize(randn(B, T, Hk, K), dim=-1)
    v = randn(B, T, H, V)
    u = torch.rand(B, T, H, generator=gen, dtype=dtype)
    g = {"near_zero": -1e-4 * u, "moderate": -u, "strong": -20 * u - 5, "mixed": torch.log(u) * 3}[gate]
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    h0 = randn(B, H, K, V)
    return [x.requires_grad_() for x in (q, k, v, g, beta, h0)]


CASES = [
    # (B, T, Hk, H, K, V)
    (2, 1, 2, 2, 16, 16),
    (1, 63, 2, 4, 16, 24),
    (2, 64, 1, 4, 32, 16),
    (1, 65, 2, 2, 16, 16),
    (2, 130, 2, 8, 8, 32),
    (1, 200, 4, 4, 16, 16),
]


@pytest.mark.parametrize("gate", ["near_zero", "moderate", "strong", "mixed"])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "B{}_T{}_Hk{}_H{}_K{}_V{}".format(*s))
def test_chunk_matches_recurrent(shape, gate):
    xs = make_inputs(*shape, gate=gate)
    q, k, v, g, beta, h0 = xs
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    ds = torch.randn(s.shape, generator=gen, dtype=s.dtype)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), xs)
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), xs)
    for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=lambda m, name=name: f"d{name}: {m}")


def test_chunk_without_initial_state_and_small_chunks():
    q, k, v, g, beta, _ = make_inputs(2, 37, 2, 4, 8, 8, gate="moderate")
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta)
    for C in (4, 16, 64):
        o, s = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=C)
        torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9)
    (o.sum() + s.sum()).backward()  # no initial state: gradients still flow to the inputs
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_chunk_float32_close_to_float64():
    xs64 = make_inputs(2, 200, 2, 4, 32, 32, gate="mixed")
    xs32 = [x.detach().float() for x in xs64]
    o64, s64 = recurrent_gated_delta_rule(*xs64[:5], initial_state=xs64[5])
    o32, s32 = chunk_gated_delta_rule(*xs32[:5], initial_state=xs32[5])
    assert o32.dtype == torch.float32 and s32.dtype == torch.float32
    torch.testing.assert_close(o32.double(), o64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s32.double(), s64, rtol=1e-4, atol=1e-4)


def test_split_sequence_equals_whole():
    """Two chunked calls chained through the state equal one call (what chunked prefill relies on)."""
    q, k, v, g, beta, h0 = (x.detach() for x in make_inputs(1, 150, 2, 4, 16, 16, gate="moderate"))
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    o1, s1 = chunk_gated_delta_rule(q[:, :70], k[:, :70], v[:, :70], g[:, :70], beta[:, :70], initial_state=h0)
    o2, s2 = chunk_gated_delta_rule(q[:, 70:], k[:, 70:], v[:, 70:], g[:, 70:], beta[:, 70:], initial_state=s1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s, rtol=1e-10, atol=1e-10)


def test_recurrent_step_matches_recurrent():
    q, k, v, g, beta, h0 = (x.detach().float() for x in make_inputs(2, 5, 2, 6, 16, 8, gate="moderate"))
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    state = h0.clone()
    outs = [recurrent_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, 16**-0.5) for t in range(5)]
    torch.testing.assert_close(torch.stack(outs, 1), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s_ref, rtol=1e-5, atol=1e-5)


def test_traced_recurrent_step_matches_recurrent():
    """The form a compiled decoding step takes (the state read once for Sᵀk and Sᵀq, decayed after):
    the reference's outputs and states, value heads sharing key heads included."""
    q, k, v, g, beta, h0 = (x.detach().float() for x in make_inputs(2, 5, 2, 6, 16, 8, gate="mixed"))
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    state = h0.clone()
    outs = [traced_recurrent_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, 16**-0.5)
            for t in range(5)]
    torch.testing.assert_close(torch.stack(outs, 1), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s_ref, rtol=1e-5, atol=1e-5)


def test_conv_paths_agree():
    gen = torch.Generator().manual_seed(0)
    B, T, C, W = 2, 11, 6, 4
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    weight = torch.randn(C, 1, W, generator=gen, dtype=torch.float64)
    ref = F.silu(F.conv1d(x.transpose(1, 2), weight, padding=W - 1, groups=C)[..., :T]).transpose(1, 2)
    torch.testing.assert_close(causal_conv1d(x, weight), ref)
    # one step at a time
    window = torch.zeros(B, C, W, dtype=torch.float64)
    steps = torch.stack([causal_conv1d_step(x[:, t], conv_taps(weight), window) for t in range(T)], 1)
    torch.testing.assert_close(steps, ref)
    # a prefix, then the rest continuing from the window
    window = torch.zeros(B, C, W, dtype=torch.float64)
    a = causal_conv1d(x[:, :3], weight, window)
    update_window(window, x[:, :3])
    b = causal_conv1d(x[:, 3:], weight, window)
    update_window(window, x[:, 3:])
    torch.testing.assert_close(torch.cat([a, b], 1), ref)
    torch.testing.assert_close(window, x[:, -W:].transpose(1, 2))
    # a window that is a view of a larger cache (not contiguous) slides the same way
    big = torch.zeros(B, C, 2 * W, dtype=torch.float64)
    view = big[..., ::2]
    steps = torch.stack([causal_conv1d_step(x[:, t], conv_taps(weight), view) for t in range(T)], 1)
    torch.testing.assert_close(steps, ref)
    torch.testing.assert_close(view, x[:, -W:].transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3])
def test_decode_attention_equals_sdpa(dtype, T):
    """The decoding step's attention (two batched products, GQA by blocks of query rows; and the sums a
    compiled step of one sequence takes instead) against SDPA with repeated key heads, with padded keys
    and, for several new tokens, a causal corner."""
    from sakimi_next.model import _padded_causal_mask, decode_attention, traced_decode_attention

    gen = torch.Generator().manual_seed(0)
    B, nH, nKV, L, D = 3, 4, 2, 9, 8
    q, k, v = (torch.randn(*s, generator=gen).to(dtype) for s in ((B, nH, T, D), (B, nKV, L, D), (B, nKV, L, D)))
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, :2] = key_mask[2, :5] = False  # left padding of two rows
    for mask in (None, _padded_causal_mask(key_mask, T)):
        if mask is None and T > 1:
            mask = torch.ones(T, L, dtype=torch.bool).tril(L - T)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=D**-0.5,
                                             enable_gqa=True)
        for attention in (decode_attention, traced_decode_attention):  # the second: a compiled step's form
            ours = attention(q, k, v, mask, D**-0.5)
            assert ours.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("with_window", [False, True])
def test_conv_matches_conv1d_forward_and_backward(with_window):
    from sakimi_next.kernels.conv import causal_conv1d_reference

    gen = torch.Generator().manual_seed(3)
    B, T, C, W = 3, 37, 10, 4
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(C, 1, W, generator=gen, dtype=torch.float64, requires_grad=True)
    window = torch.randn(B, C, W, generator=gen, dtype=torch.float64) if with_window else None
    dy = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    ours = causal_conv1d(x, weight, window)
    ref = causal_conv1d_reference(x, weight, window)
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad((ours * dy).sum(), (x, weight))
    g_ref = torch.autograd.grad((ref * dy).sum(), (x, weight))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_model_trains_under_bf16_autocast():
    """The kernels do their own math in float32 and must not trip over the caller's autocast."""
    from sakimi_next.model import Qwen3NextForCausalLM

    from .helpers import small_config

    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(small_config())
    x = torch.randint(0, model.config.vocab_size, (2, 70))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x[:, :-1], x[:, 1:])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x[:, :-1], x[:, 1:]).loss.backward()  # backward inside autocast too


@pytest.mark.parametrize("gate", ["moderate", "strong"])
def test_chunk_document_starts_match_recurrent(gate):
    """Packed documents: the state is dropped where a document starts, exactly as the recurrence does,
    with starts at t = 0, at chunk boundaries, inside chunks and two in a row."""
    B, T = 2, 150
    xs = make_inputs(B, T, 2, 4, 16, 16, gate=gate, seed=4)
    q, k, v, g, beta, h0 = xs
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, [0, 5, 63, 64, 100, 101]] = True
    starts[1, [31, 128]] = True
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, doc_starts=starts)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, doc_starts=starts)
    torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9)
    gen = torch.Generator().manual_seed(2)
    do, ds = torch.randn(o.shape, generator=gen, dtype=o.dtype), torch.randn(s.shape, generator=gen, dtype=s.dtype)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), xs)
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), xs)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    # and a document on its own gives the same outputs as inside the pack
    t0, t1 = 5, 63
    alone, _ = recurrent_gated_delta_rule(*(x[:1, t0:t1] for x in (q, k, v, g, beta)))
    torch.testing.assert_close(o[0, t0:t1], alone[0], rtol=1e-9, atol=1e-9)


def test_conv_with_document_starts():
    """Each packed document convolves as if alone (its past is zeros), forward and backward."""
    gen = torch.Generator().manual_seed(5)
    B, T, C, W = 1, 20, 6, 4
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(C, 1, W, generator=gen, dtype=torch.float64, requires_grad=True)
    starts = torch.zeros(B, T, dtype=torch.bool)
    bounds = [0, 7, 8, 14, T]  # documents [0,7) [7,8) [8,14) [14,20)
    starts[0, bounds[1:-1]] = True
    dy = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    packed = causal_conv1d(x, weight, None, starts)
    alone = torch.cat([causal_conv1d(x[:, a:b], weight) for a, b in zip(bounds, bounds[1:])], dim=1)
    torch.testing.assert_close(packed, alone)
    g_packed = torch.autograd.grad((packed * dy).sum(), (x, weight))
    g_alone = torch.autograd.grad((alone * dy).sum(), (x, weight))
    for a, b in zip(g_packed, g_alone):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 8, 16])
def test_step_linear_matches_f_linear(dtype, rows):
    """The decoding matmul (oneDNN's packed weight where it is faster, else F.linear) computes F.linear:
    float32 to rounding (one row: exactly, it is F.linear), bfloat16 to bfloat16 rounding; on x86 with
    AVX-512 the packed path is the one taken for bf16 and several float32 rows, and one float32 row never
    makes the packed copy."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(768, 256, generator=gen).to(dtype)
    x = torch.randn(rows, 1, 256, generator=gen).to(dtype)
    step = StepLinear(w)
    y, ref = step(x), F.linear(x, w)
    assert y.shape == ref.shape == (rows, 1, 768) and y.dtype == dtype
    if dtype == torch.float32 and rows == 1:
        assert torch.equal(y, ref)
    else:
        torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=1e-4 if dtype == torch.float32 else 0.25)
    wants_onednn = dtype == torch.bfloat16 or rows > 1
    assert ("packed" in step.__dict__) == wants_onednn  # made on first use, by the path that uses it
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512") and torch.backends.mkldnn.is_available()
    if wants_onednn and avx512:
        assert step.__dict__["packed"] is not None


def _exported_products(x: torch.Tensor, w: torch.Tensor, dynamic_rows: bool):
    """(the ATen operations of `step_linear(x, w)` exported, the exported program), x's rows fixed or
    symbolic."""
    class Product(torch.nn.Module):
        def forward(self, x, w):
            return step_linear(x, w)
    shapes = ({0: torch.export.Dim("rows", min=2, max=64)}, None) if dynamic_rows else None
    exported = torch.export.export(Product(), (x, w), dynamic_shapes=shapes)
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    return ops, exported


@pytest.mark.parametrize("rows", [1, 4])
def test_a_traced_step_of_a_few_rows_multiplies_as_a_reduction(rows):
    """Traced for one sequence (a compiled decoding step of batch 1, or a speculative verification pass
    of a few tokens), a float32 product of a few rows is a product summed over the inputs (inductor's own
    kernel, threaded over the weight's rows) and computes F.linear to float32 rounding; more rows, and a
    program for any batch, keep the matmul. Eagerly it is F.linear."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(384, 256, generator=gen)
    few = torch.randn(1, rows, 256, generator=gen)
    assert torch.equal(step_linear(few, w), F.linear(few, w))
    ops, exported = _exported_products(few, w, dynamic_rows=False)
    assert "aten.sum.dim_IntList" in ops and not any("mm" in op or "linear" in op for op in ops)
    torch.testing.assert_close(exported.module()(few, w), F.linear(few, w), rtol=1e-5, atol=1e-5)
    many = torch.randn(1, TRACED_ROWS_MAX + 1, 256, generator=gen)
    ops, _ = _exported_products(many, w, dynamic_rows=False)
    assert any("linear" in op or "mm" in op for op in ops) and "aten.sum.dim_IntList" not in ops
    rows = torch.randn(4, 1, 256, generator=gen)
    ops, exported = _exported_products(rows, w, dynamic_rows=True)
    assert any("linear" in op or "mm" in op for op in ops) and "aten.sum.dim_IntList" not in ops
    torch.testing.assert_close(exported.module()(rows, w), F.linear(rows, w), rtol=1e-5, atol=1e-5)


def test_step_linear_keeps_autograd_and_copies():
    """A tensor that needs a gradient takes F.linear (the packed op has no backward); a deep copy packs
    its own weight (oneDNN's opaque tensors cannot be copied), and so does a deep-copied model."""
    import copy

    from sakimi_next.config import preset
    from sakimi_next.model import Qwen3NextForCausalLM

    w = torch.randn(64, 32)
    x = torch.randn(4, 32, requires_grad=True)
    step = StepLinear(w)
    step(x).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, 32))
    twin = copy.deepcopy(step)
    assert torch.equal(twin.weight, w) and twin.weight.data_ptr() != w.data_ptr()
    torch.testing.assert_close(twin(x.detach()), step(x.detach()), rtol=0, atol=0)

    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(preset("tiny_5m")).eval()
    tokens = torch.tensor([5, 7, 9])
    with torch.inference_mode():
        cache = model.new_cache(3)
        logits = model.decode_step(tokens, cache)  # builds and packs the fused decoding weights
    twin_model = copy.deepcopy(model)
    with torch.inference_mode():
        torch.testing.assert_close(twin_model.decode_step(tokens, twin_model.new_cache(3)), logits, rtol=0, atol=0)


def test_a_compiled_product_of_one_row_normalises_its_input_once():
    """Inductor inlines a cheap elementwise input into the product that reads it, i.e. recomputes it
    for each of the weight's rows: an RMSNorm's square root and division, 1,552 times a layer, made
    tiny_10m's compiled step 1.4x slower. The traced product takes its input as computed once: no
    square root inside the loop over the weight's rows, and F.linear's values."""
    from torch._inductor.utils import run_and_get_code

    from sakimi_next.model import rms_norm_small

    gen = torch.Generator().manual_seed(0)
    x, scale = torch.randn(1, 1, 256, generator=gen), torch.randn(256, generator=gen)
    w = torch.randn(384, 256, generator=gen)
    torch._dynamo.reset()
    product = torch.compile(lambda x, scale, w: step_linear(rms_norm_small(x, scale, 1e-6), w), backend="inductor")
    with torch.no_grad():
        y, codes = run_and_get_code(product, x, scale, w)
    torch.testing.assert_close(y, F.linear(rms_norm_small(x, scale, 1e-6), w), rtol=1e-5, atol=1e-5)
    code = "\n".join(codes)
    rows_loop = code.find("<static_cast<int64_t>(384L)")
    assert rows_loop > 0 and "std::sqrt" in code[:rows_loop] and "std::sqrt" not in code[rows_loop:]
