"""--quantize int8 and --dtype bf16 against float32, on real text (the CPython docs), with a small model
trained on them: next-token agreement and bits per byte, through the prompt's forward and the decoding
step; the int8 kernel against its plain reference."""

import math

import pytest
import torch

from sakimi_next.evaluate import bits_per_byte as nats_to_bits_per_byte
from sakimi_next.evaluate import score
from sakimi_next.kernels.linear import Int8StepLinear, int8_linear, int8_linear_reference, quantize_rows
from sakimi_next.pretrained import load_for_inference
from sakimi_next.quantize import int8_weights, quantize_int8, resolve_dtype

from .serve_support import docs, make_served_checkpoint


def test_quantize_rows_is_symmetric_per_row_and_idempotent():
    w = torch.randn(70, 48) * torch.logspace(-3, 1, 70)[:, None]  # rows of very different sizes
    w[5] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert (q.abs().amax(1)[torch.arange(70) != 5] == 127).all()  # each row's largest weight uses the range
    assert scale[5] == 1 and (q[5] == 0).all()
    assert torch.equal(scale, scale.bfloat16().float())  # a bf16 value: q * scale is exact in float32
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] * 0.505).all()  # round to nearest (the bf16 scale moves it a little)
    q2, scale2 = quantize_rows(q.float() * scale[:, None])
    assert torch.equal(q2, q) and torch.equal(scale2, scale)


def test_int8_linear_equals_its_reference():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    lin = Int8StepLinear(w)
    for rows in (1, 3, 8):
        x = torch.randn(rows, 64)
        ref = int8_linear_reference(x, lin.q, lin.scale.float())
        # bfloat16 activations and output, float32 accumulation
        torch.testing.assert_close(lin(x), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
        exact = int8_linear_reference(x.bfloat16().float(), lin.q, lin.scale.float())
        torch.testing.assert_close(int8_linear(x, lin.q, lin.scale).float(), exact.bfloat16().float(), rtol=1e-2,
                                   atol=1e-2)


@pytest.mark.parametrize("rows", [1, 4])
def test_a_traced_int8_product_of_a_few_rows_is_a_reduction(rows):
    """In a compiled step for one sequence an int8 product of a few rows is summed by inductor's own
    kernel (float32 activations; no library call per product, which cost more than its arithmetic):
    the reference in float32."""
    torch.manual_seed(0)
    lin = Int8StepLinear(torch.randn(96, 64))
    x = torch.randn(rows, 64)

    class Product(torch.nn.Module):
        def forward(self, x, q, scale):
            return int8_linear(x, q, scale)

    exported = torch.export.export(Product(), (x, lin.q, lin.scale))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "aten.sum.dim_IntList" in ops and not any("int8pack" in op for op in ops)
    ref = int8_linear_reference(x, lin.q, lin.scale.float())
    torch.testing.assert_close(exported.module()(x, lin.q, lin.scale), ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_served_checkpoint(tmp_path_factory.mktemp("quantize"), steps=40)


@pytest.fixture(scope="module")
def held_out(checkpoint):
    """~4,000 tokens of docs the model was not trained on, and their UTF-8 bytes."""
    _, tok, _ = load_for_inference(checkpoint, "cpu")
    text = "\n\n".join(docs()[60:])[:16_000]
    ids = torch.tensor([tok.eot_id] + tok.encode(text))
    return ids, len(text.encode("utf-8"))


def bits_per_byte(model, ids, n_bytes) -> float:
    nats, _ = score(model, ids, 256)
    return nats_to_bits_per_byte(nats, n_bytes)


@torch.inference_mode()
def forward_choices(model, ids) -> torch.Tensor:
    return model(ids[None, :-1]).logits[0].argmax(-1)


@torch.inference_mode()
def step_choices_and_nats(model, ids) -> tuple[torch.Tensor, float]:
    """The decoding step's next-token choice at every position, fed the true text (teacher forcing), and
    the nats it gives the text: the int8 matmuls of decoding, not only the forward's."""
    cache = model.new_cache(1, capacity=len(ids))
    choices, nats = [], 0.0
    for t in range(len(ids) - 1):
        logits = model.decode_step(ids[t:t + 1], cache)[0].float()
        choices.append(int(logits.argmax()))
        nats -= float(torch.log_softmax(logits, -1)[ids[t + 1]])
    return torch.tensor(choices), nats


def test_int8_costs_little_on_held_out_text(checkpoint, held_out):
    ids, n_bytes = held_out
    fp32, _, _ = load_for_inference(checkpoint, "cpu")
    int8, _, info = load_for_inference(checkpoint, "cpu", quantize="int8")
    assert info["quantize"] == "int8"
    names = [n for n, _ in int8_weights(int8)]
    assert "model.embed_tokens.weight" in names and not any(n.endswith("mlp.gate.weight") for n in names)
    base = bits_per_byte(fp32, ids, n_bytes)
    cost = bits_per_byte(int8, ids, n_bytes) - base
    assert base < 6.0  # the model learned something (a uniform guess over 512 tokens is ~9 bits a token)
    assert abs(cost) <= 0.01, cost
    agree = (forward_choices(int8, ids) == forward_choices(fp32, ids)).float().mean()
    assert agree >= 0.98, agree

    n = 600  # the decoding step, token by token: its int8 products (bf16 activations)
    reference = forward_choices(fp32, ids[:n + 1])
    choices, nats = step_choices_and_nats(int8, ids[:n + 1])
    assert (choices == reference).float().mean() >= 0.98
    fp32_nats, _ = score(fp32, ids[:n + 1], 256)
    step_bytes = n_bytes * n / (len(ids) - 1)  # about the bytes of the first n tokens
    assert abs(nats - fp32_nats) / math.log(2) / step_bytes <= 0.01


def test_bf16_costs_little_on_held_out_text(checkpoint, held_out):
    """bf16 weights and activations (emulated where the CPU has no bf16: slower, same numbers)."""
    ids, n_bytes = held_out
    fp32, _, _ = load_for_inference(checkpoint, "cpu")
    bf16 = load_for_inference(checkpoint, "cpu")[0].to(torch.bfloat16)
    cost = bits_per_byte(bf16, ids[:2001], n_bytes * 2000 / (len(ids) - 1)) - bits_per_byte(
        fp32, ids[:2001], n_bytes * 2000 / (len(ids) - 1))
    assert abs(cost) <= 0.02, cost
    agree = (forward_choices(bf16, ids[:2001]) == forward_choices(fp32, ids[:2001])).float().mean()
    assert agree >= 0.98, agree


def test_quantizing_twice_changes_nothing(checkpoint):
    model, _, _ = load_for_inference(checkpoint, "cpu", quantize="int8")
    before = {n: p.clone() for n, p in model.named_parameters()}
    quantize_int8(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_bf16_falls_back_where_the_cpu_has_none(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    dtype, note = resolve_dtype("bf16", torch.device("cpu"))
    assert dtype == "fp32" and "no bfloat16" in note and len(note.splitlines()) == 1
    assert resolve_dtype("fp32", torch.device("cpu")) == ("fp32", None)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_dtype("bf16", torch.device("cpu")) == ("bf16", None)


def test_eval_reports_the_cost_against_float32(checkpoint, tmp_path, capsys):
    from sakimi_next.cli import main

    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(docs()[60:])[:3000])
    assert main(["--mode", "eval", "--resume-from", str(checkpoint), "--text-file", str(text), "--quantize", "int8",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "int8" in lines[0] and "float32" in lines[1]
    assert lines[2].startswith("int8 costs ") and "bits/byte" in lines[2]
