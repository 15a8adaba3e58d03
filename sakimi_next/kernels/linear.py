"""The matrix products of decoding: `x @ weight.T` for a few rows (one token of each sequence in a
batch), where the weights are read from memory at every step.

The plain reference is `F.linear`. On x86 CPUs with AVX-512, oneDNN with the weight reordered once
into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the packing inductor's CPU
freezing uses) is measured faster in two cases (tiny_10m's weights, one thread; README "Serving,
measured"):

    float32, 2-16 rows      1.5-3x faster than F.linear (MKL): 8 rows x the 4,096 x 256 output layer
                            take 93 us instead of 267
    bfloat16, any rows      ~1.4x faster (one row x the output layer: 38 us instead of 64)

and slower in one: float32 with one row, where MKL's matrix-vector product has no ~10 us fixed cost.
So `StepLinear` takes oneDNN there and F.linear everywhere else (other CPUs, GPUs, torch.compile,
autocast, float16). The two differ only in the order of a sum's terms (float32: ~1e-7 relative; bfloat16:
the same bits).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

ROWS_HINT = 8  # the rows oneDNN lays the weight out for: a server's batch; one row runs as fast


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
        return F.linear(x, self.weight)
