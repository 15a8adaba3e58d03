"""Lower-precision weights for inference: `--dtype bf16` and `--quantize int8`.

- `--dtype bf16`: every weight and activation in bfloat16 (the DeltaNet state stays float32). Faster only
  where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX) or on a GPU; elsewhere the CPU emulates
  it, ~3x slower than float32 for decoding's matrix products, so `resolve_dtype` says so in one line and
  keeps float32.
- `--quantize int8`: the weights of every matrix product of decoding (projections, MLP, experts, the
  embedding and the tied LM head) rounded to int8 with one scale per output row (`kernels.linear.
  quantize_rows`). The model's own weights are replaced by their int8 values (q * scale, exact in
  float32), so the prompt's forward, `--mode eval` and the decoding step all compute the same model;
  the decoding step streams the int8 copy (`Int8StepLinear`: bfloat16 activations, or float32 ones in
  a compiled step of one sequence). The router, the shared expert's gate (one output each: they steer
  rather than compute), the conv and the norms stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .kernels.linear import quantize_rows


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run in hardware here: a GPU, or a CPU with AVX512-BF16 or AMX."""
    if device.type != "cpu":
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(dtype: str, device: torch.device) -> tuple[str, str | None]:
    """(the dtype to use, a note for the user or None): bf16 falls back to fp32 where it would be slower."""
    if dtype == "bf16" and not native_bf16(device):
        return "fp32", ("note: this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX), where --dtype bf16 "
                        "decodes slower than float32: using float32")
    return dtype, None


def int8_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights `quantize_int8` rounds: every matrix of a decoding product, by name."""
    out = []
    for name, p in model.named_parameters():
        steering = name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight")
        if p.ndim >= 2 and "conv1d" not in name and not steering:
            out.append((name, p))
    return out


@torch.no_grad()
def quantize_int8(model: nn.Module) -> int:
    """Put the model's matrices on the int8 grid in place and mark them, so that the decoding step
    multiplies by an int8 copy. Returns the number of weights quantized. A tied embedding / LM head is
    one weight (one scale per token row). Quantizing twice changes nothing."""
    weights = int8_weights(model)
    for _, p in weights:
        q, scale = quantize_rows(p)
        p.copy_(q.float() * scale[..., None])
        p.weight_format = "int8"
    return len(weights)
