"""The matrix products of decoding: `x @ weight.T` for a few rows (one token of each sequence in a
batch), where the weights are read from memory at every step.

The plain reference is `F.linear`. On x86 CPUs with AVX-512, oneDNN with the weight reordered once
into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the packing inductor's CPU
freezing uses) is measured faster in two cases (tiny_10m's weights, one thread; docs/benchmarks.md,
"Serving"):

    float32, 2-16 rows      1.5-3x faster than F.linear (MKL): 8 rows x the 4,096 x 256 output layer
                            take 93 us instead of 267
    bfloat16, any rows      ~1.4x faster (one row x the output layer: 38 us instead of 64)

and slower in one: float32 with one row, where MKL's matrix-vector product has no ~10 us fixed cost.
So `StepLinear` takes oneDNN there and F.linear everywhere else (other CPUs, GPUs, torch.compile,
autocast, float16). The two differ only in the order of a sum's terms (float32: ~1e-7 relative; bfloat16:
the same bits).

`Int8StepLinear` holds a weight as int8 with one float scale per output row (symmetric, as gpt-fast's
`WeightOnlyInt8Linear` and llama.cpp's q8_0 per block): a quarter of float32's bytes to stream at each
step. On a CPU it multiplies with `torch.ops.aten._weight_int8pack_mm`, which wants bfloat16 activations
(it converts each int8 row on the fly; with float32 activations the same op is ~8x slower); its plain
reference is `int8_linear_reference`. Measured on an AVX2-only EPYC, one thread, tiny_10m's step weights
one after another: 1.0 ms per token against 4.5 ms for float32 `F.linear` (9.4 MB of int8 stay in the
last-level cache; 37.6 MB of float32 do not).

In a compiled step for one sequence (`decoder.py`: the weights are the program's arguments, so inductor
cannot pack them), a product of one row is written as `traced_matvec`, a broadcast product summed over
the inputs: inductor makes it a reduction kernel of its own that splits the weight's rows over the
threads, where its `mm` of one row runs MKL's on one core whatever the threads. tiny_10m's step matrices,
one row each, on the AVX2 EPYC: 4.4 ms as `F.linear` at 1 or 2 threads, 4.8 ms as inductor's `mm`, 3.5 ms
as this reduction at 1 thread and 2.2 ms at 2 (17 GB/s; llama.cpp's f32 streams ~16). An int8 product
of a few rows is the same reduction over the int8 weight (converted as it is read) times the row
scales, in float32: on the AVX512 EPYC, 2 threads, tiny_10m's int8 matrices took 0.40 ms as reductions
in one compiled graph against 0.49 ms as `_weight_int8pack_mm` calls, whose fixed cost (~15 us a call in
the compiled step) outweighed their arithmetic; the whole int8 step went from 1.0 to 0.54 ms. (Before a
product's input was computed once, see `traced_matvec`, the int8 reduction had measured 6.5 ms on the
AVX2 EPYC.) A few rows (a verification pass of speculative decoding) take the same kernel: MKL's `mm` of
2 to 8 rows was slower still than its one row (e.g. 9.2 ms against 2.8 on 2 rows of matrices that stay in
the cache, where the reduction took 0.74 ms; with one thread and 38 MB of weights, 8 rows took 20 ms as
reductions and 22 ms as `mm`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ROWS_HINT = 8  # the rows oneDNN lays the weight out for: a server's batch; one row runs as fast


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., out, in] -> (int8 [..., out, in], scale [..., out]): symmetric, one scale per output
    row, round to nearest, |q| <= 127. The scale is a bfloat16 value (kept in float32), so q * scale is
    exact in float32 and quantizing q * scale again gives back the same q and scale: a model whose
    weights were put on this grid (`quantize.quantize_int8`) holds exactly what its int8 step multiplies.
    An all-zero row gets scale 1."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=-1) / 127).to(torch.bfloat16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale


TRACED_ROWS_MAX = 8  # a speculative verification pass of one sequence: the draft and the token before it


def few_traced_rows(x: torch.Tensor) -> bool:
    """Whether `x` [..., in] has at most TRACED_ROWS_MAX rows, known as a constant while it is traced (a
    program for one sequence; a dynamic batch's rows are symbolic)."""
    lead = x.shape[:-1]
    return all(isinstance(d, int) for d in lead) and math.prod(lead) <= TRACED_ROWS_MAX


def traced_matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] (a few rows) @ weight.T -> [..., out], as inductor should compile it (see above).
    x is made a buffer of its own first (a view needs storage): inductor would otherwise inline a cheap
    elementwise input such as an RMSNorm (a square root and a division) into the product, computing it
    again for every row of the weight; that made tiny_10m's compiled step 1.4x slower."""
    return (computed_once(x).unsqueeze(-2) * weight).sum(-1)


def computed_once(x: torch.Tensor) -> torch.Tensor:
    """x as a buffer of its own in a compiled graph (a view needs storage; eagerly, x itself), so that
    inductor does not inline it into a product that reads each element once per weight row."""
    x = x.contiguous()
    return x.as_strided(x.shape, x.stride())


def step_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight), as `traced_matvec` in a compiled float32 CPU step of a few rows."""
    if (torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and few_traced_rows(x)):
        return traced_matvec(x, weight)
    return F.linear(x, weight)


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (q * scale).T in x's dtype: what `int8_linear` computes, plainly."""
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale_bf16: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (q * scale).T -> [..., out] in x's dtype, through `_weight_int8pack_mm` on a CPU
    (bfloat16 activations, float32 accumulation), a float32 reduction in a compiled step of a few float32
    rows (see above), the reference elsewhere."""
    if x.device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return int8_linear_reference(x, q, scale_bf16)
    if torch.compiler.is_compiling() and x.dtype == torch.float32 and few_traced_rows(x):
        return traced_matvec(x, q) * scale_bf16.float()
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), q, scale_bf16)
    return y.view(*x.shape[:-1], q.shape[0]).to(x.dtype)


def onednn_packed(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in] in oneDNN's blocked layout, or None where that is not measured faster."""
    if (weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)
            or not torch.backends.mkldnn.is_available()
            or not torch.backends.cpu.get_cpu_capability().startswith("AVX512")):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)
    except (AttributeError, RuntimeError):  # a torch built without the op, or a weight it refuses
        return None


class StepLinear:
    """A weight for decoding (inference only, e.g. several projections fused into one) and the faster of
    F.linear and oneDNN for the rows at hand."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    @functools.cached_property
    def packed(self) -> torch.Tensor | None:
        """oneDNN's copy of the weight, made when first wanted (one float32 row never wants it)."""
        return onednn_packed(self.weight)

    # oneDNN's opaque tensors cannot be copied or pickled: a copied model (copy.deepcopy) packs again
    def __getstate__(self) -> dict:
        return {"weight": self.weight}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["weight"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == self.weight.dtype and (x.dtype == torch.bfloat16 or x.numel() > x.shape[-1])
                and not x.requires_grad and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled("cpu") and self.packed is not None):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return step_linear(x, self.weight)


class Int8StepLinear:
    """A decoding weight (see StepLinear) stored as int8 rows and their scales (`quantize_rows`)."""

    def __init__(self, weight: torch.Tensor):
        q, scale = quantize_rows(weight)
        self.q, self.scale = q.contiguous(), scale.to(torch.bfloat16)  # exact: see quantize_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.q, self.scale)


# ------------------------------------------------------------------- weights made once for decoding
def inference_weight(module: nn.Module, name: str, params: tuple[torch.Tensor, ...], build):
    """`build()` (weights fused for one-token decoding), cached on `module` until one of `params`
    changes: in-place updates bump a tensor's version, moving it changes its storage. (Not every update
    does: torch's fused AdamW step leaves the version as it was, so nothing of training reads these.) While the step is
    compiled or exported (`decoder.py`) the weights built eagerly before are used as they are."""
    if torch.compiler.is_compiling():
        return module.__dict__[name][1]
    key = tuple((p._version, p.data_ptr()) for p in params)
    cached = module.__dict__.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, build())
        module.__dict__[name] = cached
    return cached[1]


def is_int8(params: tuple[torch.Tensor, ...]) -> bool:
    """True when every one of these weights was put on the int8 grid (`quantize.quantize_int8`)."""
    return all(getattr(p, "weight_format", None) == "int8" for p in params)


def inference_linear(module: nn.Module, name: str, params: tuple[torch.Tensor, ...], build=None):
    """`inference_weight` for a matrix product of decoding: `build()` (default: the one weight in
    `params`) as a `StepLinear`, which picks the faster matmul for the rows at hand, or as an
    `Int8StepLinear` when the weights are int8 ones."""
    kind = Int8StepLinear if is_int8(params) else StepLinear
    return inference_weight(module, name, params, lambda: kind(build() if build else params[0]))
