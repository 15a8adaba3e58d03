"""Sparse MoE layers compute what transformers' Qwen3-Next computes: logits, the loss with its
load-balancing term, every gradient; routing ties, a router that sends every token to one expert, padding;
the tiny_10m_moe preset's counts; export to and import from transformers' per-expert files."""

import re
import warnings

import pytest
import torch

from sakimi_next.cli import main
from sakimi_next.config import nominal_size, preset
from sakimi_next.export.hf import export_hf
from sakimi_next.huggingface import load_hf_config, load_hf_tensors
from sakimi_next.model import Qwen3NextForCausalLM, active_parameters, count_parameters, parameter_breakdown
from sakimi_next.moe import SparseMoeBlock, load_balancing_loss

from .helpers import hf_twin, make_checkpoint, small_config, train_briefly

MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
CONFIGS = {
    # every layer sparse, top-2 of 8, renormalised top-k weights, tied embedding
    "E8_top2_norm_all_layers": small_config(**MOE, router_aux_loss_coef=0.05),
    # 6 layers, sparse every 2nd (1, 3, 5) but layer 3 dense; top-3 of 6 without renormalising;
    # a narrow shared expert; untied
    "E6_top3_raw_step2_mlp_only3": small_config(
        num_hidden_layers=6, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24,
        shared_expert_intermediate_size=16, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[3],
        tie_word_embeddings=False, router_aux_loss_coef=0.1),
}


def shifted(x: torch.Tensor) -> torch.Tensor:
    """Our targets (already shifted) for transformers' labels=x."""
    return torch.cat([x[:, 1:], torch.full((x.shape[0], 1), -100)], dim=1)


def assert_grads_match(model, hf):
    """The rule of test_parity_transformers.py: relative error <= 1e-4, measured against at least
    1e-3 of the largest gradient in the model (tiny gradients are float32 round-off for both)."""
    hf_params = dict(hf.named_parameters())
    floor = 1e-3 * max(p.grad.norm() for p in hf.parameters() if p.grad is not None)
    for name, p in model.named_parameters():
        g_ref = hf_params[name].grad
        assert p.grad is not None and g_ref is not None, name
        assert torch.isfinite(p.grad).all(), name
        rel = (p.grad - g_ref).norm() / torch.maximum(g_ref.norm(), floor)
        assert rel.item() <= 1e-4, f"{name}: relative gradient error {rel.item():.2e}"


def compare(model, T, B=2, seed=0):
    """Logits, aux loss, loss (cross-entropy + coef * aux) and every gradient against transformers."""
    torch.manual_seed(seed)
    hf = hf_twin(model)
    x = torch.randint(0, model.config.vocab_size, (B, T))
    ours = model(x, shifted(x))
    ref = hf(x, labels=x, output_router_logits=True)
    assert torch.isfinite(ours.logits).all()
    assert (ours.logits - ref.logits).abs().max().item() <= 1e-4
    torch.testing.assert_close(ours.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)
    if T == 1:  # every target is ignored: the cross-entropy is NaN for both
        return ours, ref
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=1e-5)
    # the aux term is far above that tolerance, so the loss comparison does cover it
    assert model.config.router_aux_loss_coef * ours.aux_loss.item() > 1e-2
    ours.loss.backward()
    ref.loss.backward()
    assert_grads_match(model, hf)
    return ours, ref


@pytest.mark.parametrize("T", [1, 63, 65, 130])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_moe(name, T):
    torch.manual_seed(1)
    model = Qwen3NextForCausalLM(CONFIGS[name])
    with torch.no_grad():  # move the norms off their initial values so they matter too
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    compare(model, T)


def test_moe_layers_are_where_transformers_puts_them():
    model = Qwen3NextForCausalLM(CONFIGS["E6_top3_raw_step2_mlp_only3"])
    hf = hf_twin(model)
    ours = [type(layer.mlp).__name__ for layer in model.model.layers]
    theirs = [type(layer.mlp).__name__ for layer in hf.model.layers]
    assert ours == ["MLP", "SparseMoeBlock", "MLP", "MLP", "MLP", "SparseMoeBlock"]
    assert theirs == ["Qwen3NextMLP", "Qwen3NextSparseMoeBlock", "Qwen3NextMLP", "Qwen3NextMLP", "Qwen3NextMLP",
                      "Qwen3NextSparseMoeBlock"]


# ------------------------------------------------------------------------------------ routing cases
def routed_experts(model) -> list[torch.Tensor]:
    """Hooks every router: the returned list receives each call's chosen experts [N, k]."""
    chosen = []
    for m in model.modules():
        if isinstance(m, SparseMoeBlock):
            m.gate.register_forward_hook(lambda mod, inp, out: chosen.append(out[2]))
    return chosen


@pytest.mark.parametrize("identical_experts", [True, False], ids=["identical_experts", "distinct_experts"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_all_experts_tie(name, identical_experts):
    """A zero router gives every expert probability 1/E: top-k is decided by tie-breaking alone, which must
    be transformers' (distinct experts make any other choice visible). The aux loss is then exactly k."""
    torch.manual_seed(5)
    model = Qwen3NextForCausalLM(CONFIGS[name])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SparseMoeBlock):
                m.gate.weight.zero_()
                if identical_experts:
                    m.experts.gate_up_proj.copy_(m.experts.gate_up_proj[:1].expand_as(m.experts.gate_up_proj))
                    m.experts.down_proj.copy_(m.experts.down_proj[:1].expand_as(m.experts.down_proj))
    ours, ref = compare(model, T=65)
    k = model.config.num_experts_per_tok
    assert ours.aux_loss.item() == pytest.approx(k, abs=1e-6) and ref.aux_loss.item() == pytest.approx(k, abs=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_token_routed_to_one_expert(name):
    """Hidden dim 0 made large and positive everywhere (through the embedding), and a router that reads only
    dim 0, for expert 3: every token's first choice is expert 3 (router logit ~40 against 0), the other k-1
    are ties among experts of probability ~1e-17. The aux loss is then ~E, its maximum."""
    torch.manual_seed(6)
    model = Qwen3NextForCausalLM(CONFIGS[name])
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for m in model.modules():
            if isinstance(m, SparseMoeBlock):
                m.gate.weight.zero_()
                m.gate.weight[3, 0] = 5.0
    chosen = routed_experts(model)
    ours, ref = compare(model, T=65)
    assert chosen and all((c[:, 0] == 3).all() for c in chosen)
    E = model.config.num_experts
    assert ours.aux_loss.item() == pytest.approx(E, rel=1e-5)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])  # transformers' two CPU paths for the experts
@pytest.mark.parametrize("k", [1, 2])
def test_block_with_one_expert_taking_every_token(k, impl):
    """The MoE block alone against transformers' block: output and gradients of the input and every weight,
    when expert 5 takes every token (k = 1: it alone; k = 2: it and ties among the others)."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    config = small_config(**{**MOE, "num_experts_per_tok": k})
    torch.manual_seed(7)
    ours = SparseMoeBlock(config)
    ours.reset_parameters(0.02)
    with torch.no_grad():
        ours.shared_expert_gate.weight.normal_(0, 0.02)
        ours.gate.weight[5] += 0.1 * torch.sign(torch.arange(64) % 2 - 0.5)  # reads -x0 + x1 - x2 + ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hcfg = Qwen3NextConfig(**config.to_hf_dict())
        hcfg._experts_implementation = impl
        theirs = Qwen3NextSparseMoeBlock(hcfg)
    theirs.load_state_dict(ours.state_dict())
    x = 0.1 * torch.randn(3, 40, 64)
    x[..., 1::2] += 1.0
    x[..., 0::2] -= 1.0
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, logits = ours(x_ours)
    assert (logits.topk(k).indices[:, 0] == 5).all()  # router logit ~6.4 for expert 5, |.| < 1 for the rest
    y_ref = theirs(x_theirs)
    assert torch.isfinite(y).all()
    assert (y - y_ref).abs().max().item() <= 1e-6
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-5, atol=1e-7)
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    # the router learns through the routing weights; one renormalised choice has weight p / p = 1, whose
    # gradient is zero up to round-off
    router_grad = ours.gate.weight.grad.abs().max().item()
    assert router_grad < 1e-8 if k == 1 else router_grad > 1e-5


def test_experts_no_token_chose_get_zero_gradient():
    config = small_config(**MOE)
    torch.manual_seed(8)
    block = SparseMoeBlock(config)
    block.reset_parameters(0.02)
    x = torch.randn(2, 9, 64)
    experts = torch.tensor([[1, 4]]).expand(18, 2)
    weights = torch.full((18, 2), 0.5)
    block.experts(x.reshape(-1, 64), experts, weights).square().sum().backward()
    used = block.experts.gate_up_proj.grad.flatten(1).abs().sum(1) > 0
    assert used.tolist() == [e in (1, 4) for e in range(8)]


def test_bf16_autocast():
    """Under autocast the expert matmuls give bf16 while the residual stream is float32: the block must
    still add them up (in float32, as transformers does), and its gradients must flow."""
    torch.manual_seed(13)
    block = SparseMoeBlock(small_config(**MOE))
    block.reset_parameters(0.02)
    x = torch.randn(2, 33, 64, requires_grad=True)
    full = block(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)[0]
    assert y.dtype == torch.float32
    assert (y - full).abs().max().item() <= 0.02 * full.abs().max().item()
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in [x, *block.parameters()])


# ------------------------------------------------------------------------------------------ aux loss
def test_aux_loss_equals_transformers_function():
    """Our load_balancing_loss against transformers' load_balancing_loss_func on the same router logits,
    with and without a padding mask (and the mask changes the value)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import load_balancing_loss_func

    config = small_config(**MOE)
    g = torch.Generator().manual_seed(9)
    logits = [torch.randn(3 * 20, 8, generator=g) * s for s in (0.5, 2.0, 5.0)]
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, :7] = 0
    mask[2, :19] = 0
    for m in (None, mask):
        ours = load_balancing_loss(logits, config, None if m is None else m.bool())
        theirs = load_balancing_loss_func(tuple(logits), 8, 2, m)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert abs(load_balancing_loss(logits, config, mask.bool()) - load_balancing_loss(logits, config)) > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_aux_loss_with_left_padding(name):
    """A left-padded batch: logits of the real tokens, and the aux loss, which leaves padding out, equal
    transformers' with the same attention_mask."""
    torch.manual_seed(10)
    model = Qwen3NextForCausalLM(CONFIGS[name])
    hf = hf_twin(model)
    x = torch.randint(0, model.config.vocab_size, (3, 70))
    mask = torch.ones_like(x)
    mask[0, :9] = 0
    mask[2, :50] = 0
    ours = model(x, attention_mask=mask)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = hf(x, attention_mask=mask, position_ids=position_ids, output_router_logits=True)
    real = mask.bool()
    assert (ours.logits[real] - ref.logits[real]).abs().max().item() <= 1e-4
    torch.testing.assert_close(ours.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)
    unpadded = model(x).aux_loss  # the mask does change the value
    assert abs(unpadded.item() - ours.aux_loss.item()) > 1e-4


# -------------------------------------------------------------------------------------------- presets
TINY_10M_MOE_TOTAL = 31_480_800
TINY_10M_MOE_ACTIVE = 9_460_704


def test_tiny_10m_moe_counts():
    config = preset("tiny_10m_moe")
    total = sum(count_parameters(config).values())
    assert total == TINY_10M_MOE_TOTAL
    assert sum(per * n for _, per, n in parameter_breakdown(config)) == total
    # 8 layers, each with 16 routed experts of 3 * 256 * 256 weights, of which a token uses 2
    assert active_parameters(config) == TINY_10M_MOE_ACTIVE == total - 8 * 14 * 3 * 256 * 256
    assert nominal_size("tiny_10m_moe") == 1e7  # the name promises the active size
    assert abs(TINY_10M_MOE_ACTIVE - sum(count_parameters(preset("tiny_10m")).values())) < 0.005 * 1e7
    assert all(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def test_active_parameters_follow_the_moe_layers():
    """Dense layers (decoder_sparse_step, mlp_only_layers) count in full; the MTP block's MoE counts k of E."""
    config = small_config(num_hidden_layers=6, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                          decoder_sparse_step=2, mlp_only_layers=[3], mtp_num_hidden_layers=1)
    total = sum(count_parameters(config).values())
    moe_blocks = 3  # layers 1 and 5, and the MTP block's layer (sparse like the last layer)
    assert sum(isinstance(m, SparseMoeBlock) for m in Qwen3NextForCausalLM(config).modules()) == moe_blocks
    assert active_parameters(config) == total - moe_blocks * (6 - 2) * 3 * 64 * 24
    dense = small_config()
    assert active_parameters(dense) == sum(count_parameters(dense).values())


def test_mode_test_prints_total_and_active(capsys):
    assert main(["--config", "tiny_10m_moe", "--mode", "test", "--batch-size", "1", "--seq-len", "8",
                 "--device", "cpu", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ *num_experts +16$", out, re.M) and re.search(r"^ *num_experts_per_tok +2$", out, re.M)
    for needle in ("MoE router (16 experts)", "MoE routed experts (16 x 256 wide, 2 per token)",
                   "MoE shared expert (256 wide) + gate", "31,480,800", "active per token: 9,460,704 of 31,480,800"):
        assert needle in out, needle


# --------------------------------------------------------------------------------------------- interop
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from sakimi_next.tokenizer import train_tokenizer

    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo frogs".split()
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist())
    tok = train_tokenizer([text], 300)
    tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return tok


def test_export_moe_loads_in_transformers(tmp_path, tokenizer):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    torch.manual_seed(11)
    config = CONFIGS["E6_top3_raw_step2_mlp_only3"].replace(vocab_size=300)
    model = Qwen3NextForCausalLM(config)
    train_briefly(model, 300, steps=2)
    out = export_hf(make_checkpoint(tmp_path / "run", model, tokenizer), tmp_path / "exported")

    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.5.gate_proj.weight" in names
    assert "model.layers.5.mlp.experts.0.down_proj.weight" in names
    assert not any("gate_up_proj" in n or n.endswith("experts.down_proj") for n in names)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    x = torch.randint(0, 300, (2, 70))
    with torch.no_grad():
        assert (hf(x).logits - model(x).logits).abs().max().item() <= 1e-4

    back = load_hf_tensors(out)  # round trip: byte-identical
    ours = model.state_dict()
    assert set(back) == set(ours)
    for k, v in ours.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert load_hf_config(out) == model.config


def test_import_transformers_moe_save_pretrained(tmp_path):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM as HF

    from sakimi_next.checkpoint import load_weights

    config = CONFIGS["E8_top2_norm_all_layers"]
    torch.manual_seed(12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = HF(Qwen3NextConfig(**config.to_hf_dict())).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        hf.save_pretrained(tmp_path / "hf")
    model = Qwen3NextForCausalLM(load_hf_config(tmp_path / "hf")).eval()
    load_weights(model, load_hf_tensors(tmp_path / "hf"), tmp_path / "hf")
    x = torch.randint(0, config.vocab_size, (2, 70))
    with torch.no_grad():
        ours, ref = model(x), hf(x, output_router_logits=True)
    assert (ours.logits - ref.logits).abs().max().item() <= 1e-4
    torch.testing.assert_close(ours.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("int8", [False, True])
def test_the_traced_expert_step_equals_the_routed_forward(int8):
    """The form a compiled step takes (each row's chosen experts gathered inside the products, no host
    read of the ids), run eagerly: the grouped forward's output, float32 to rounding; int8 (its own
    copy, float32 activations) to the forward on the rounded weights."""
    from sakimi_next.quantize import quantize_int8

    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(CONFIGS["E6_top3_raw_step2_mlp_only3"]).eval()
    if int8:
        quantize_int8(model)
    block = next(m for m in model.modules() if isinstance(m, SparseMoeBlock))
    x = torch.randn(5, model.config.hidden_size)
    with torch.inference_mode():
        _, weights, experts = block.gate(x)
        ref = block.experts(x, experts, weights)
        block.experts.step(x[:1], experts[:1], weights[:1])  # an eager step makes the int8 copy
        ours = block.experts._traced_step(x, experts, weights)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 9, 40])
def test_every_eager_step_path_equals_the_routed_forward(rows):
    """The step's eager paths by the number of (row, choice) pairs: one product per pair (few), padded
    batched products (a few per expert), the forward's grouping (many): the forward's output."""
    torch.manual_seed(1)
    model = Qwen3NextForCausalLM(CONFIGS["E6_top3_raw_step2_mlp_only3"]).eval()
    block = next(m for m in model.modules() if isinstance(m, SparseMoeBlock))
    x = torch.randn(rows, model.config.hidden_size)
    with torch.inference_mode():
        _, weights, experts = block.gate(x)
        torch.testing.assert_close(block.experts.step(x, experts, weights), block.experts(x, experts, weights),
                                   rtol=1e-5, atol=1e-5)

