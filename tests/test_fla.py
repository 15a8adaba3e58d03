"""The fla path without a GPU: when `--kernel auto` takes fla and why not (said once), and what our wrapper
passes to fla's `chunk_gated_delta_rule`, checked against the plain recurrence through a CPU fake of fla's
contract (tests/fake_fla.py)."""

import importlib.util
import logging

import pytest
import torch
import torch.nn.functional as F

from sakimi_next.kernels import fla_problem, gated_delta_rule, recurrent_gated_delta_rule, resolve_kernel
from sakimi_next.model import Qwen3NextForCausalLM
from sakimi_next.util import UserError

from . import fake_fla
from .helpers import small_config


@pytest.fixture(autouse=True)
def forget_fla():
    fake_fla.uninstall()
    yield
    fake_fla.uninstall()


def test_no_cuda_no_fla_import(monkeypatch):
    """Without CUDA the answer comes before fla is looked at (SPEC pitfall 10): even an old fla is
    not the reason given."""
    fake_fla.install(monkeypatch, version="0.4.2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fla_problem() == "CUDA is not available"
    assert resolve_kernel("auto", "cpu") == "chunk"


@pytest.mark.parametrize("case, expected", [
    ("missing", "flash-linear-attention is not installed"),
    ("old", "flash-linear-attention 0.4.2 is older than 0.5.0; pip install 'fla-core==0.5.2'"),
    ("broken", "fla 0.5.2 is installed but fla.ops.gated_delta_rule does not import: ModuleNotFoundError"),
])
def test_auto_says_once_why_not_fla(monkeypatch, caplog, case, expected):
    fake_fla.install(monkeypatch, version="0.4.2" if case == "old" else "0.5.2", ops=case != "broken")
    if case == "missing":
        monkeypatch.setitem(__import__("sys").modules, "fla", None)  # what `import fla` then raises: ImportError
    with caplog.at_level(logging.WARNING, logger="sakimi_next.kernels"):
        assert [resolve_kernel("auto", "cuda") for _ in range(3)] == ["chunk"] * 3
    (record,) = caplog.records
    assert record.getMessage().startswith("note: --kernel auto uses the chunk kernel, not fla: ")
    assert expected in record.getMessage() and "\n" not in record.getMessage()
    with pytest.raises(UserError, match="kernel 'fla' cannot run: .*" + expected.split(" (")[0][:30]):
        resolve_kernel("fla", "cuda")


def test_auto_takes_a_recent_fla(monkeypatch, caplog):
    fake_fla.install(monkeypatch, version="0.6.0.dev3+gabc")
    with caplog.at_level(logging.WARNING):
        assert resolve_kernel("auto", "cuda") == "fla" and resolve_kernel("fla", "cuda:1") == "fla"
        assert resolve_kernel("chunk", "cuda") == "chunk"
    assert not caplog.records


def inputs(B, T, Hk, H, K=8, V=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, Hk, K, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, T, Hk, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = (-4 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)).float().double()  # fla's gates: float32
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).float().double()  # fla's states: float32
    return [x.requires_grad_() for x in (q, k, v, g, beta, h0)]


def document_starts(B, T, positions):
    starts = torch.zeros(B, T, dtype=torch.bool)
    for b, t in positions:
        starts[b, t] = True
    return starts


# row 0 opens on a document start (its initial state is dropped), has a one-token document and one
# starting at the last position; row 1 is one document; row 2 has two starts inside
DOCS = [(0, 0), (0, 5), (0, 6), (0, 29), (2, 10), (2, 20)]
CASES = {  # (B, T, Hk, H, initial state, document starts)
    "gva": (2, 37, 2, 4, True, None),
    "one_step": (2, 1, 2, 4, True, None),
    "no_initial_state": (2, 20, 2, 2, False, None),
    "documents": (3, 30, 2, 4, True, DOCS),
    "documents_no_initial_state": (3, 30, 1, 2, False, DOCS),
}


@pytest.mark.parametrize("case", CASES)
def test_fla_wrapper_matches_recurrence(monkeypatch, case):
    """Outputs, final states and every gradient equal the reference; q and k reach fla with their own
    (fewer) heads; packed documents reach it as one row with the expected cu_seqlens and states."""
    fake_fla.install(monkeypatch)
    B, T, Hk, H, with_h0, docs = CASES[case]
    q, k, v, g, beta, h0 = xs = inputs(B, T, Hk, H)
    h0 = h0 if with_h0 else None
    starts = document_starts(B, T, docs) if docs else None
    ref = recurrent_gated_delta_rule(q, k, v, g, beta, 0.3, h0, True, starts)
    out = gated_delta_rule("fla", q, k, v, g, beta, 0.3, h0, True, starts)
    gen = torch.Generator().manual_seed(1)
    dout = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in ref]
    wrt = xs if with_h0 else xs[:5]
    grads_ref = torch.autograd.grad(sum((x * d).sum() for x, d in zip(ref, dout)), wrt)
    grads = torch.autograd.grad(sum((x.double() * d).sum() for x, d in zip(out, dout)), wrt)
    for name, a, b in zip(["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"], [*out, *grads],
                          [*ref, *grads_ref]):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")

    (call,) = fake_fla.calls
    if docs is None:
        assert call["q"] == call["k"] == (B, T, Hk, 8) and call["v"] == (B, T, H, 8)
        assert call["cu_seqlens"] is None and call["initial_state"] == (None if h0 is None else (B, H, 8, 8))
    else:
        assert call["q"] == (1, B * T, Hk, 8) and call["v"] == (1, B * T, H, 8)
        assert call["cu_seqlens"] == [0, 5, 6, 29, 30, 60, 70, 80, 90]
        assert call["initial_state"] == (None if h0 is None else (8, H, 8, 8))


def test_fla_wrapper_without_final_state_and_packing_once(monkeypatch):
    """output_final_state=False gives None; the packing of one doc_starts tensor is made once for all
    the layers of a forward (one host sync), and again for another tensor."""
    fake_fla.install(monkeypatch)
    from sakimi_next.kernels import fla as wrapper

    q, k, v, g, beta, _ = inputs(3, 30, 2, 4)
    starts = document_starts(3, 30, DOCS)
    wrapper._packing.cache_clear()
    for _ in range(3):
        o, s = gated_delta_rule("fla", q, k, v, g, beta, None, None, False, starts)
        assert s is None and o.shape == v.shape
    gated_delta_rule("fla", q, k, v, g, beta, None, None, False, starts.clone())
    assert wrapper._packing.cache_info().misses == 2 and wrapper._packing.cache_info().hits == 2


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "documents"])
def test_model_with_fla_equals_chunk(monkeypatch, packed):
    """The whole model (2 key heads, 4 value heads) gives the same loss and gradients through
    the fla wrapper as through the chunk kernel, with and without document masking."""
    fake_fla.install(monkeypatch)
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(small_config())
    x = torch.randint(0, model.config.vocab_size, (2, 40))
    starts = document_starts(2, 40, [(0, 7), (0, 8), (1, 0), (1, 33)]) if packed else None
    results = []
    for kernel in ("chunk", "fla"):
        assert model.set_kernel(kernel, "cuda") == kernel
        model.zero_grad(set_to_none=True)
        loss = model(x[:, :-1], x[:, 1:], doc_starts=None if starts is None else starts[:, :-1]).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_chunk, grads_chunk), (loss_fla, grads_fla) = results
    torch.testing.assert_close(loss_fla, loss_chunk, rtol=1e-5, atol=0)
    for a, b in zip(grads_fla, grads_chunk, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert len(fake_fla.calls) == 3  # one per DeltaNet layer: the fla path really ran


def test_hopper_with_an_old_triton_falls_back_to_chunk(monkeypatch, caplog):
    """fla 0.5.2 raises in its first backward on an H100 whose Triton is below 3.7.1 (wrong gradients, fla
    issue #640), as a run on an H100 with torch 2.11 and Triton 3.6.0 showed: auto trains with chunk and
    says why; with tilelang installed (fla then routes that kernel to it) fla is taken."""
    fake_fla.install(monkeypatch, hopper_old_triton=True)
    with caplog.at_level(logging.WARNING, logger="sakimi_next.kernels"):
        assert resolve_kernel("auto", "cuda") == "chunk"
    assert "refuses to train on a Hopper GPU" in caplog.records[0].getMessage()
    with pytest.raises(UserError, match="kernel 'fla' cannot run: fla 0.5.2 refuses"):
        resolve_kernel("fla", "cuda")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tilelang" else find_spec(name, *a))
    fake_fla.uninstall()
    assert resolve_kernel("auto", "cuda") == "fla"


def test_model_with_fla_continues_a_lead_in(monkeypatch):
    """A training window that continues a lead-in's state (read without gradient into a cache, which each
    layer then updates in place) gives the same loss and gradients through fla as through chunk: fla
    keeps the initial state for its backward, so it must get a copy (on an H100 the in-place update
    made the backward fail)."""
    fake_fla.install(monkeypatch)
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(small_config())
    x = torch.randint(0, model.config.vocab_size, (2, 41))
    lead = torch.randint(0, model.config.vocab_size, (2, 24))
    results = []
    for kernel in ("chunk", "fla"):
        model.set_kernel(kernel, "cuda")
        model.zero_grad(set_to_none=True)
        cache = model.new_cache(2, capacity=24 + 40)
        with torch.no_grad():
            model(lead, cache=cache)
        model(x[:, :-1], x[:, 1:], cache=cache).loss.backward()
        results.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert len(fake_fla.calls) == 3 * 2  # the lead-in and the window, each through every DeltaNet layer
