"""Qwen3-Next in one file: a hybrid of Gated DeltaNet (linear attention) and Gated Attention layers.

    input_ids -> embed_tokens -> [DecoderLayer x N] -> norm -> lm_head -> logits
    DecoderLayer:  h = x + mixer(input_layernorm(x));  out = h + mlp(post_attention_layernorm(h))
    mixer: GatedDeltaNet for "linear_attention" layers, GatedAttention for "full_attention" (every 4th)

It computes what `transformers.Qwen3NextForCausalLM` computes, with the same parameter names and shapes,
so a state dict moves between the two without renaming. The gated delta rule itself lives in
`kernels/` (a plain recurrent reference, a chunked kernel, and flash-linear-attention on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .cache import AttentionCache, Cache, LinearAttentionCache
from .config import FULL, LINEAR, Config
from .kernels import chunk_gated_delta_rule, gated_delta_rule, recurrent_step, resolve_kernel
from .kernels.conv import causal_conv1d, causal_conv1d_step, conv_taps, update_window
from .kernels.linear import few_traced_rows, inference_linear, inference_weight
from .moe import SparseMoeBlock


def rms_norm_small(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.rms_norm for the tiny tensors of one decoding step, where the fused kernel's ~20 µs fixed cost
    dominates: x * rsqrt(mean(x²) + eps) (* weight)."""
    r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    return x * r if weight is None else x * r * weight


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: x / rms(x) * (1 + w) in float32; w starts at zero."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps).type_as(x)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """The same for decoding (inference only)."""
        scale = inference_weight(self, "_scale", (self.weight,), lambda: 1.0 + self.weight.float())
        if x.dtype == torch.float32:  # skip no-op casts: at one token, every call costs
            return rms_norm_small(x, scale, self.eps)
        return rms_norm_small(x.float(), scale, self.eps).type_as(x)


class RMSNormGated(nn.Module):
    """RMSNorm of each value head, times a plain weight (starts at one), times silu(z)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return (self.weight * xf.to(dtype) * F.silu(z.float())).to(dtype)

    def step(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The same for decoding (inference only)."""
        if x.dtype == torch.float32:
            return rms_norm_small(x, self.weight, self.eps).mul_(F.silu(z))
        return (rms_norm_small(x.float(), self.weight, self.eps) * F.silu(z.float())).to(x.dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(sum(x²) + eps), as one fused RMSNorm: rms_norm(x, eps/d) = sqrt(d) * l2norm(x)."""
    d = x.shape[-1]
    return F.rms_norm(x, (d,), None, eps / d) * d**-0.5


# The step path reads this many tokens or more (a short prompt; not drafts being verified, whose every
# state is kept) with the chunked kernel: tiny_10m, 12 tokens in 10.6 ms against 11.9 token by token.
STEP_CHUNK_MIN = 8


def l2norm_small(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """l2norm for the tiny tensors of one decoding step."""
    return x * torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(eps).rsqrt_()


# ----------------------------------------------------------------------------------------- attention
class RotaryEmbedding(nn.Module):
    """cos/sin of NeoX-style RoPE for the first `rotary_dim` dims of each head."""

    def __init__(self, config: Config):
        super().__init__()
        dim = config.rotary_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, T, rotary_dim]."""
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, h, D]; rotates pairs (i, i + rot/2) of the first rot dims, passes the rest through."""
    rot = cos.shape[-1]
    cos, sin = cos[:, :, None], sin[:, :, None]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attn_mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Softmax attention of a few new queries q [B, nH, T, D] over the cache keys, values [B, nKV, L, D]
    (attn_mask bool, broadcastable to [B, 1, T, L], or None) as two batched products in float32: at T = 1, SDPA's CPU
    kernels cost ~60 µs per row in bf16 (a seventh of a batched decoding step). Each key head's nH/nKV
    query heads form one block of rows, so keys are never repeated."""
    B, nH, T, D = q.shape
    nKV, L = keys.shape[1], keys.shape[2]
    f32 = torch.float32  # also for bf16: its small batched products are slower than float32's on a CPU
    if torch.compiler.is_compiling() and q.device.type == "cpu" and few_traced_rows(q[:, 0, :, 0]):
        return traced_decode_attention(q, keys, values, attn_mask, scale)
    scores = torch.matmul(q.reshape(B, nKV, nH // nKV * T, D).to(f32), keys.transpose(2, 3).to(f32)).mul_(scale)
    scores = scores.view(B, nH, T, L)
    if attn_mask is not None:
        scores.masked_fill_(~attn_mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.matmul(probs.view(B, nKV, nH // nKV * T, L), values.to(f32)).view(B, nH, T, D).to(q.dtype)


def traced_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            attn_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """`decode_attention` as a compiled step of one sequence should see it: both products as sums of
    elementwise products, which inductor fuses with the mask and the softmax into its own loops over the
    cache, where batched products of one row would each be a library call."""
    B, nH, T, D = q.shape
    nKV, L = keys.shape[1], keys.shape[2]
    f32, dtype = torch.float32, q.dtype
    q = q.reshape(B, nKV, nH // nKV * T, 1, D).to(f32)
    scores = (q * keys[:, :, None].to(f32)).sum(-1).mul(scale).view(B, nH, T, L)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = scores.softmax(dim=-1).view(B, nKV, nH // nKV * T, L, 1)
    return (probs * values[:, :, None].to(f32)).sum(-2).view(B, nH, T, D).to(dtype)


class GatedAttention(nn.Module):
    """Causal GQA softmax attention with q/k norms, partial RoPE and a sigmoid output gate per channel."""

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        H, D = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(H, self.num_heads * D * 2, bias=False)  # query and gate, per head
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=False)
        self.q_norm = RMSNorm(D, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(D, eps=config.rms_norm_eps)
        self.dropout = config.attention_dropout

    def forward(self, x, rope, attn_mask=None, cache: AttentionCache | None = None, cache_start: int = 0):
        """x [B, T, H]; rope = (cos, sin) [B, T, rot]; attn_mask [B, 1, T, L] bool (True = attend) or
        None for plain causal attention over the T new positions (and everything cached before)."""
        B, T, _ = x.shape
        D = self.head_dim
        q, gate = self.q_proj(x).view(B, T, self.num_heads, 2 * D).split(D, dim=-1)
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, D))
        v = self.v_proj(x).view(B, T, self.num_kv_heads, D)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v, cache_start)
        # with a cache and several new tokens, SDPA's is_causal would align the wrong corner
        is_causal = False
        if attn_mask is None and T > 1:  # a branch: a symbolic T (torch.compile) must not reach SDPA as a SymBool
            is_causal = True
        if is_causal and k.shape[2] != T:
            attn_mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=D**-0.5,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.num_heads != self.num_kv_heads,
        )
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * D)
        return self.o_proj(y * torch.sigmoid(gate.reshape(B, T, -1)))

    def step(self, x, rope, attn_mask, cache: AttentionCache, position: int) -> torch.Tensor:
        """A few decoding positions x [B, T, H] (inference only): one fused q/k/v matmul, then attention
        over the cache. rope (cos, sin) [B, T, rot]; attn_mask [B, 1, T, L], or None for causal;
        position: where the new keys go, an int (an `AttentionCache`) or a tensor of cache columns (a
        `FixedAttentionCache`, whose whole capacity is attended through attn_mask: decoder.py)."""
        B, T = x.shape[:2]
        D, nH, nKV = self.head_dim, self.num_heads, self.num_kv_heads
        qkv = inference_linear(self, "_qkv", (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight),
                               lambda: torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
        qg, k, v = qkv(x).split([2 * nH * D, nKV * D, nKV * D], dim=-1)
        q, gate = qg.view(B, T, nH, 2 * D).split(D, dim=-1)
        q = apply_rotary(self.q_norm.step(q), *rope)
        k = apply_rotary(self.k_norm.step(k.view(B, T, nKV, D)), *rope)
        keys, values = cache.append(k.transpose(1, 2), v.view(B, T, nKV, D).transpose(1, 2), position)
        if attn_mask is None and T > 1:
            L = keys.shape[2]
            attn_mask = torch.ones(T, L, dtype=torch.bool, device=x.device).tril(L - T)
        y = decode_attention(q.transpose(1, 2), keys, values, attn_mask, D**-0.5)
        o_proj = inference_linear(self, "_o", (self.o_proj.weight,))
        return o_proj(y.transpose(1, 2).reshape(B, T, nH * D) * torch.sigmoid(gate.reshape(B, T, nH * D)))


# ------------------------------------------------------------------------------------- gated deltanet
class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule.

    Projections are grouped per key head as in the released weights: in_proj_qkvz gives, for each of
    the Hk key heads, [q dk | k dk | v r*dv | z r*dv] (r = Hv/Hk value heads per key head), and
    in_proj_ba gives [b r | a r]. q, k, v pass a depthwise causal conv + SiLU; beta = sigmoid(b),
    g = -exp(A_log) * softplus(a + dt_bias) is the per-step log decay.
    """

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim, self.value_dim = config.linear_key_dim, config.linear_value_dim
        self.conv_dim = config.linear_conv_dim
        H, r = config.hidden_size, self.num_v_heads // self.num_k_heads
        self.in_proj_qkvz = nn.Linear(H, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(H, 2 * self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.linear_conv_kernel_dim, bias=False,
                                groups=self.conv_dim, padding=config.linear_conv_kernel_dim - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads).uniform_(0.01, 16).log())
        self.norm = RMSNormGated(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, H, bias=False)
        self.kernel = "chunk"
        # Row order that turns the per-key-head grouping into [q | k | v | z | b | a] blocks, q, k, v in
        # the conv's channel order: gathering the weights' rows is cheaper than reshuffling activations.
        blk, bb = 2 * self.head_k_dim + 2 * r * self.head_v_dim, 2 * r
        heads = torch.arange(self.num_k_heads)[:, None]
        rows = lambda start, width, block: (heads * block + start + torch.arange(width)).flatten()  # noqa: E731
        order = torch.cat([rows(0, self.head_k_dim, blk), rows(self.head_k_dim, self.head_k_dim, blk),
                           rows(2 * self.head_k_dim, r * self.head_v_dim, blk),
                           rows(2 * self.head_k_dim + r * self.head_v_dim, r * self.head_v_dim, blk),
                           blk * self.num_k_heads + rows(0, r, bb), blk * self.num_k_heads + rows(r, r, bb)])
        self.register_buffer("proj_order", order, persistent=False)
        self.proj_split = [self.conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads]

    def projection_weight(self) -> torch.Tensor:
        """in_proj_qkvz and in_proj_ba stacked and reordered: [conv_dim + value_dim + 2 Hv, H]."""
        # index_select, not [order]: its backward is an index_add, ~4x cheaper than advanced indexing's
        return torch.index_select(torch.cat([self.in_proj_qkvz.weight, self.in_proj_ba.weight]), 0, self.proj_order)

    def forward(self, x, pad_mask=None, cache: LinearAttentionCache | None = None, doc_starts=None):
        """x [B, T, H]; pad_mask [B, T] (1 = token, 0 = padding) or None; doc_starts [B, T] bool or None
        (packed documents: conv and state do not reach across a start). Returns [B, T, H]."""
        if pad_mask is not None:  # padding must not leak into the conv window or the state
            x = x * pad_mask[..., None].to(x.dtype)
        B, T, _ = x.shape
        Hk, Hv, dk, dv = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        # The stacked weight is made once for inference (a prompt, `--mode eval`), never in training: a fused
        # AdamW step does not bump the weights' versions, which tell the cache that they changed. (Compiling
        # is asked first: dynamo cannot trace is_inference_mode_enabled.)
        if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
            weight = self.projection_weight()
        else:
            weight = inference_weight(self, "_proj_weight", (self.in_proj_qkvz.weight, self.in_proj_ba.weight),
                                      self.projection_weight)
        qkv, z, b, a = F.linear(x, weight).split(self.proj_split, dim=-1)

        if cache is not None and T == 1:
            qkv = causal_conv1d_step(qkv[:, 0], conv_taps(self.conv1d.weight), cache.conv_window)[:, None]
        else:
            window = cache.conv_window if cache is not None else None
            new_qkv = qkv
            qkv = causal_conv1d(qkv, self.conv1d.weight, window, doc_starts)
            if cache is not None:
                update_window(cache.conv_window, new_qkv)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2norm(q.unflatten(-1, (Hk, dk)).float())
        k = l2norm(k.unflatten(-1, (Hk, dk)).float())
        v = v.unflatten(-1, (Hv, dv))
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)

        if cache is not None and T == 1 and self.kernel != "fla":
            o = recurrent_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache.recurrent_state,
                               dk**-0.5)[:, None]
        else:
            state = cache.recurrent_state if cache is not None else None
            o, final = gated_delta_rule(self.kernel, q, k, v, g, beta, dk**-0.5, state, cache is not None,
                                        doc_starts)
            if cache is not None:
                cache.recurrent_state.copy_(final)
        o = self.norm(o, z.unflatten(-1, (Hv, dv)))
        return self.out_proj(o.flatten(2))

    def step(self, x: torch.Tensor, cache: LinearAttentionCache) -> torch.Tensor:
        """A few decoding positions x [B, T, H] (inference only): the recurrence one token at a time,
        a fixed amount of work per token whatever the context; from STEP_CHUNK_MIN tokens on (a short
        prompt), the chunked kernel."""
        B, T = x.shape[:2]
        Hk, Hv, dk, dv = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        params = (self.in_proj_qkvz.weight, self.in_proj_ba.weight)
        proj = inference_linear(self, "_proj", params,
                                lambda: inference_weight(self, "_proj_weight", params, self.projection_weight))
        qkv, z, b, a = proj(x).split(self.proj_split, dim=-1)
        if cache.history is not None:
            cache.inputs = qkv
        if T == 1:
            taps = inference_weight(self, "_conv_taps", (self.conv1d.weight,), lambda: conv_taps(self.conv1d.weight))
            qkv = causal_conv1d_step(qkv[:, 0], taps, cache.conv_window)[:, None]
        else:
            qkv, new = causal_conv1d(qkv, self.conv1d.weight, cache.conv_window), qkv
            update_window(cache.conv_window, new)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        neg_A = inference_weight(self, "_neg_A", (self.A_log,), lambda: -self.A_log.float().exp())
        if a.dtype != torch.float32:
            a, q, k = a.float(), q.float(), k.float()
        g, beta = F.softplus(a + self.dt_bias).mul_(neg_A), b.sigmoid()
        q, k, v = l2norm_small(q.view(B, T, Hk, dk)), l2norm_small(k.view(B, T, Hk, dk)), v.view(B, T, Hv, dv)
        if T >= STEP_CHUNK_MIN and cache.history is None and not torch.compiler.is_compiling():
            o, final = chunk_gated_delta_rule(q, k, v, g, beta, dk**-0.5, cache.recurrent_state)
            cache.recurrent_state.copy_(final)
            out_proj = inference_linear(self, "_out", (self.out_proj.weight,))
            return out_proj(self.norm.step(o.to(v.dtype), z.view(B, T, Hv, dv)).reshape(B, T, self.value_dim))
        outs = []
        for t in range(T):
            outs.append(recurrent_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], cache.recurrent_state,
                                       dk**-0.5))
            if cache.history is not None:  # verifying drafts: keep each position's state for a rollback
                cache.history.append(cache.recurrent_state.clone())
        o = torch.stack(outs, dim=1)
        out_proj = inference_linear(self, "_out", (self.out_proj.weight,))
        return out_proj(self.norm.step(o, z.view(B, T, Hv, dv)).view(B, T, self.value_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """The same for decoding (inference only), gate and up as one matmul."""
        gate_up = inference_linear(self, "_gate_up", (self.gate_proj.weight, self.up_proj.weight),
                                   lambda: torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        gate, up = gate_up(x).chunk(2, dim=-1)
        return inference_linear(self, "_down", (self.down_proj.weight,))(F.silu(gate) * up)


def dropout(x: torch.Tensor, p: float, rows: tuple[int, int]) -> torch.Tensor:
    """F.dropout in training. `rows` (rank, world): under torchrun this process holds rows [rank B, (rank+1) B)
    of the global batch; its mask is drawn for the whole global batch and its rows kept, so that N processes
    drop what one process with the global batch drops (every rank's generator is in the same state: same seed,
    same draws) and the ranks' masks differ. It draws N times the random numbers."""
    rank, world = rows
    if world == 1:
        return F.dropout(x, p, training=True)
    b = x.shape[0]
    noise = x.new_empty((world * b, *x.shape[1:])).bernoulli_(1 - p)[rank * b:(rank + 1) * b]
    return x * noise.div_(1 - p)  # F.dropout's own arithmetic (on a CPU): the same numbers


class DecoderLayer(nn.Module):
    dropout = 0.0  # on each residual branch while training; set with Qwen3NextForCausalLM.set_dropout
    checkpointing = False  # recompute the layer in the backward pass (set_activation_checkpointing)
    dropout_rows = (0, 1)  # (rank, world size): see `dropout`

    def __init__(self, config: Config, layer_idx: int, layer_type: str | None = None, moe: bool | None = None):
        super().__init__()
        self.layer_type = layer_type or config.layer_types[layer_idx]
        if self.layer_type == FULL:
            self.self_attn = GatedAttention(config, layer_idx)
        else:
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        moe = config.is_moe_layer(layer_idx) if moe is None else moe
        self.mlp = SparseMoeBlock(config) if moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, ctx: "_ForwardContext", cache=None):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            # keep only x; the backward runs _layer again, with the same RNG state (the same dropout masks)
            x, router_logits = checkpoint(self._layer, x, ctx, cache, True, use_reentrant=False)
        else:
            x, router_logits = self._layer(x, ctx, cache)
        if router_logits is not None:  # appended here, so that a recomputation does not count them twice
            ctx.router_logits.append(router_logits)
        return x

    def _layer(self, x, ctx: "_ForwardContext", cache=None, rerun: bool = False):
        """-> (output, the MoE router's logits or None). `rerun`: a recomputation will run it again, so a
        DeltaNet cache (a lead-in's state) is left as it was, each run continuing from a copy of it."""
        if rerun and isinstance(cache, LinearAttentionCache):  # attention caches rewrite the same keys/values
            cache = LinearAttentionCache(cache.conv_window.clone(), cache.recurrent_state.clone())
        h = self.input_layernorm(x)
        if self.layer_type == FULL:
            h = self.self_attn(h, ctx.rope, ctx.attn_mask, cache, ctx.cache_start)
        else:
            h = self.linear_attn(h, ctx.pad_mask, cache, ctx.doc_starts)
        x = x + self._drop(h)
        h, router_logits = self.mlp(self.post_attention_layernorm(x)), None
        if isinstance(h, tuple):  # MoE returns (output, router_logits)
            h, router_logits = h
        return x + self._drop(h), router_logits

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        return dropout(h, self.dropout, self.dropout_rows) if self.dropout and self.training else h

    def step(self, x: torch.Tensor, rope, attn_mask, cache, position: int) -> torch.Tensor:
        """A few decoding positions x [B, T, H] (inference only)."""
        h = self.input_layernorm.step(x)
        if self.layer_type == FULL:
            x = x + self.self_attn.step(h, rope, attn_mask, cache, position)
        else:
            x = x + self.linear_attn.step(h, cache)
        h = self.post_attention_layernorm.step(x)
        return x + self.mlp.step(h)


@dataclass
class _ForwardContext:
    """What every layer of one forward call shares."""

    rope: tuple[torch.Tensor, torch.Tensor]
    attn_mask: torch.Tensor | None  # [B, 1, T, L] bool, or None for plain causal
    pad_mask: torch.Tensor | None  # [B, T], or None when nothing is padding
    cache_start: int
    router_logits: list
    position_ids: torch.Tensor | None = None  # [B, T]
    doc_starts: torch.Tensor | None = None  # [B, T] bool: packed documents start here


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V] (or the last `logits_to_keep` positions)
    loss: torch.Tensor | None = None  # cross-entropy (+ weighted auxiliary losses when present)
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss (unweighted)
    mtp_loss: torch.Tensor | None = None  # multi-token-prediction loss (unweighted)
    hidden_states: torch.Tensor | None = None  # final hidden states after the last norm [B, T, H]


class MTPBlock(nn.Module):
    """Multi-token prediction, as in the released Qwen3-Next (DeepSeek-V3 style): from the final hidden
    state at t and the embedding of token t+1, predict token t+2 with one full-attention decoder layer;
    the embedding and the LM head are the main model's. Names follow the released checkpoints (mtp.*)."""

    def __init__(self, config: Config):
        super().__init__()
        H = config.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(H, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(H, eps=config.rms_norm_eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        last = config.num_hidden_layers - 1
        self.layers = nn.ModuleList([DecoderLayer(config, config.num_hidden_layers, FULL, config.is_moe_layer(last))])
        self.norm = RMSNorm(H, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, ctx: "_ForwardContext", cache=None):
        """hidden [B, T, H] (the main model's normed output at t), next_embeds [B, T, H] (of token t+1)
        -> normed hidden state [B, T, H] whose logits predict token t+2."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        x = self.layers[0](x, ctx, cache.layers[0] if cache is not None else None)
        return self.norm(x)


class Qwen3NextModel(nn.Module):
    """The trunk: embedding, decoder layers, final norm (transformers' `model.` prefix)."""

    def __init__(self, config: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Qwen3NextForCausalLM(nn.Module):
    dropout = 0.0  # on the embedding output while training (see set_dropout)
    attention_window: int | None = None  # of the caches it makes (see set_attention_window)
    dropout_rows = (0, 1)

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = Qwen3NextModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.mtp_num_hidden_layers:
            self.mtp = MTPBlock(config)
        self.kernel = "chunk"
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference initialisation (from the global RNG: seed it first): N(0, initializer_range)
        for matrices, the embedding and the conv; zeros for the zero-centred norms; ones for the gated
        norm and dt_bias; A_log = log U(0.01, 16)."""
        if self.device.type == "meta":
            return
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.weight.zero_()
            elif isinstance(module, RMSNormGated):
                module.weight.fill_(1.0)
            elif isinstance(module, GatedDeltaNet):
                module.dt_bias.fill_(1.0)
                module.A_log.copy_(torch.empty_like(module.A_log).uniform_(0.01, 16).log())
            elif isinstance(module, SparseMoeBlock):
                module.reset_parameters(std)

    def set_kernel(self, name: str, device=None) -> str:
        """Choose the gated delta rule kernel for every DeltaNet layer (auto|chunk|recurrent|fla)."""
        device = device if device is not None else self.device
        self.kernel = resolve_kernel(name, device)
        for m in self.modules():
            if isinstance(m, GatedDeltaNet):
                m.kernel = self.kernel
        return self.kernel

    def set_dropout(self, p: float, rows: tuple[int, int] = (0, 1)) -> None:
        """Dropout with probability `p` on the embedding output and on every residual branch, in
        training mode only. A training setting, not part of the model: not in the Config, config.json
        or the weights, so evaluation, generation and exported models never drop. `rows`: (rank, world
        size) under torchrun, so that the processes drop what one process would (`dropout`)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout {p} must be in [0, 1)")
        self.dropout, self.dropout_rows = p, rows
        for m in self.modules():
            if isinstance(m, DecoderLayer):
                m.dropout, m.dropout_rows = p, rows

    def set_activation_checkpointing(self, on: bool) -> None:
        """Keep only each decoder layer's input in the forward pass and recompute the layer in the
        backward (the MTP block's too): less memory for longer windows, the same gradients, ~1/3 more
        compute. A training setting, like dropout: the maths do not change."""
        for m in self.modules():
            if isinstance(m, DecoderLayer):
                m.checkpointing = on

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_attention_window(self, window: int | None) -> None:
        """Let attention see at most the last `window` positions (itself included) in every cache made
        from now on (`new_cache`), as in training, where no query saw more than the window and its lead-in;
        None: all of them. The DeltaNet states still carry everything. A setting of use, not of the model."""
        if window is not None and window < 1:
            raise ValueError(f"attention window {window} must be at least 1")
        self.attention_window = window

    def new_cache(self, batch_size: int, capacity: int = 256, dtype: torch.dtype | None = None) -> Cache:
        """`dtype`: of the keys, values and conv windows (default the weights'; bf16 under bf16 autocast)."""
        return Cache(self.config, batch_size, self.device, dtype or self.model.embed_tokens.weight.dtype, capacity,
                     self.attention_window)

    def new_mtp_cache(self, batch_size: int, capacity: int = 256) -> Cache:
        """The MTP block's own cache: one full-attention layer."""
        one_layer = self.config.replace(num_hidden_layers=1, layer_types=[FULL], mlp_only_layers=[])
        return Cache(one_layer, batch_size, self.device, self.model.embed_tokens.weight.dtype, capacity,
                     self.attention_window)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
        mtp_weight: float = 0.0,
        labels: torch.Tensor | None = None,
        doc_starts: torch.Tensor | None = None,
        check_ids: bool = True,
    ) -> CausalLMOutput:
        """input_ids [B, T] -> logits [B, T, V].

        targets [B, T]: the token each position should predict (already shifted, nanoGPT style; -100 is
        ignored). attention_mask [B, T] (or [B, cached + T]): 1 for tokens, 0 for left padding.
        cache: continue from (and update) a decoding cache; any T works, one token or many.
        logits_to_keep: compute logits for only the last k positions (0 = all).
        mtp_weight: with targets and an MTP block, add this times the MTP loss (reported as mtp_loss).
        labels [B, T]: transformers' convention instead of targets: position t predicts labels[t+1].
        doc_starts [B, T] bool: several documents packed in one row; where one starts, attention, the
        conv and the DeltaNet state do not reach back into the previous one (no cache, no padding).
        check_ids: check that input_ids are in the vocabulary (reading them waits for the device); False
        when the caller checked them on the host already (training: `batches.WindowSampler`).
        """
        if labels is not None:
            if targets is not None:
                raise ValueError("give targets (already shifted) or labels (shifted here), not both")
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        if check_ids:
            self._check_ids(input_ids)
        x = self.model.embed_tokens(input_ids)
        if self.dropout and self.training:
            x = dropout(x, self.dropout, self.dropout_rows)
        ctx = self._context(x, attention_mask, position_ids, cache, doc_starts)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ctx, cache.layers[i] if cache is not None else None)
        hidden = self.model.norm(x)

        h = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = F.linear(h, self.lm_head_weight)
        out = CausalLMOutput(logits=logits, hidden_states=hidden if return_hidden else None)
        if targets is not None and mtp_weight and hasattr(self, "mtp"):
            out.mtp_loss = self._mtp_loss(hidden, targets, ctx)
        if ctx.router_logits:  # the trunk's MoE layers and, when it ran, the MTP layer's
            from .moe import load_balancing_loss

            out.aux_loss = load_balancing_loss(ctx.router_logits, self.config, ctx.pad_mask)
        if targets is not None:
            # the mean over counted targets; a window with none (chat data: all prompt) adds 0, not NaN
            counted = (targets != -100).sum().clamp(min=1)
            out.loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                       reduction="sum") / counted
            if out.aux_loss is not None:
                out.loss = out.loss + self.config.router_aux_loss_coef * out.aux_loss
            if out.mtp_loss is not None:
                out.loss = out.loss + mtp_weight * out.mtp_loss
        return out

    def decode_step(self, token: torch.Tensor, cache: Cache) -> torch.Tensor:
        """token [B] -> logits [B, V] of the next position: `forward(token[:, None], cache=cache)` with
        as little work around the layers as possible (inference only: call under torch.inference_mode)."""
        return self.step_logits(self.decode_hidden(token[:, None], cache)[:, 0])

    def step_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states from the lean decoding path (`decode_hidden`, `mtp_step`),
        through the decoding step's matmul (`StepLinear`). Inference only."""
        return inference_linear(self, "_lm_head", (self.lm_head_weight,))(hidden)

    def decode_hidden(self, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
        """A few new tokens [B, T] (T small: a decoding step, or drafts to verify) -> final hidden states
        [B, T, H], through the lean step path: the DeltaNet recurrence token by token instead of the
        chunked kernel, whose fixed cost only pays off on long inputs. Inference only."""
        x = self.model.embed_tokens(tokens)
        rope, attn_mask, start = self._step_context(cache, *tokens.shape, x.dtype)
        for layer, layer_cache in zip(self.model.layers, cache.layers):
            x = layer.step(x, rope, attn_mask, layer_cache, start)
        return self.model.norm.step(x)

    def _step_context(self, cache: Cache, B: int, T: int, dtype) -> tuple:
        """RoPE, attention mask and start position for T new positions; advances the cache."""
        position = cache.next_position[:, None] + torch.arange(T, device=cache.next_position.device)
        rope = self.model.rotary_emb(position, dtype)
        attn_mask = _cached_mask(cache, cache.record(None, T), T)
        start = cache.length
        cache.length, cache.next_position = start + T, position[:, -1] + 1
        return rope, attn_mask, start

    def _context(self, x: torch.Tensor, attention_mask, position_ids, cache: Cache | None,
                 doc_starts: torch.Tensor | None = None) -> "_ForwardContext":
        """Masks, positions and RoPE for T new positions of x [B, T, H]; records them in the cache."""
        B, T = x.shape[:2]
        pad_mask = None
        if attention_mask is not None:
            pad_mask = attention_mask[:, -T:].to(torch.bool)
            if not torch.compiler.is_compiling() and bool(pad_mask.all()):
                pad_mask = None
        if position_ids is None:
            if pad_mask is not None:  # left padding: the first real token is position 0 (as generate does)
                offset = cache.next_position[:, None] if cache is not None else 0
                position_ids = (pad_mask.long().cumsum(-1) - 1).clamp(min=0) + offset
            elif cache is not None:
                position_ids = cache.next_position[:, None] + torch.arange(T, device=x.device)
            else:
                position_ids = torch.arange(T, device=x.device).expand(B, T)
        attn_mask, start = None, 0
        if cache is not None:
            attn_mask = _cached_mask(cache, cache.record(pad_mask, T), T)  # may drop old keys: length after
            start = cache.length
            cache.next_position = position_ids[:, -1] + 1
            cache.length = start + T
        elif pad_mask is not None:
            attn_mask = _padded_causal_mask(pad_mask, T)
        if doc_starts is not None:
            if cache is not None or pad_mask is not None:
                raise ValueError("doc_starts (packed documents) works without a cache and without padding")
            doc = doc_starts.long().cumsum(-1)  # which document each position is in
            same = doc[:, :, None] == doc[:, None, :]
            attn_mask = (same & torch.ones(T, T, dtype=torch.bool, device=x.device).tril())[:, None]
        rope = self.model.rotary_emb(position_ids, x.dtype)
        return _ForwardContext(rope, attn_mask, pad_mask, start, [], position_ids, doc_starts)

    # ------------------------------------------------------------------ multi-token prediction
    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                    cache: Cache | None = None, router_logits: list | None = None,
                    doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        """The MTP block on pairs (hidden [B, T, H] at t, next_ids [B, T] = token t+1) -> MTP hidden
        states [B, T, H]; `F.linear(out, model.lm_head_weight)` gives the logits of token t+2.
        position_ids are those of token t+1. An MoE MTP layer's router logits go to `router_logits`."""
        e = self.model.embed_tokens(next_ids)
        ctx = self._context(e, None, position_ids, cache, doc_starts)
        out = self.mtp(hidden, e, ctx, cache)
        if router_logits is not None:
            router_logits.extend(ctx.router_logits)
        return out

    def mtp_step(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """`mtp_forward` for a few positions through the lean step path (inference only)."""
        mtp = self.mtp
        e = self.model.embed_tokens(next_ids)
        x = mtp.fc(torch.cat([mtp.pre_fc_norm_embedding.step(e), mtp.pre_fc_norm_hidden.step(hidden)], dim=-1))
        rope, attn_mask, start = self._step_context(cache, *next_ids.shape, x.dtype)
        return mtp.norm.step(mtp.layers[0].step(x, rope, attn_mask, cache.layers[0], start))

    def _mtp_loss(self, hidden: torch.Tensor, targets: torch.Tensor, ctx: "_ForwardContext") -> torch.Tensor:
        """Cross-entropy of predicting targets[:, t+1] (token t+2) from hidden[:, t] and targets[:, t]."""
        nxt = targets[:, :-1]
        valid = nxt >= 0
        mtp_targets = targets[:, 1:].masked_fill(~valid, -100)
        h = self.mtp_forward(hidden[:, :-1], nxt.clamp(min=0), ctx.position_ids[:, 1:],
                             router_logits=None if ctx.pad_mask is not None else ctx.router_logits,
                             doc_starts=None if ctx.doc_starts is None else ctx.doc_starts[:, 1:])
        logits = F.linear(h, self.lm_head_weight)
        return F.cross_entropy(logits.float().flatten(0, 1), mtp_targets.flatten(), ignore_index=-100)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if torch.compiler.is_compiling() or input_ids.numel() == 0:
            return
        check_id_range(int(input_ids.min()), int(input_ids.max()), self.config.vocab_size)


def check_id_range(lo: int, hi: int, vocab_size: int) -> None:
    """Token ids from `lo` to `hi` must be in the vocabulary."""
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


def _cached_mask(cache: Cache, key_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """The attention mask of T new positions after the cache's (`record`'s key_mask: None when nothing
    is padding): None (plain causal) unless some key is padding or out of the cache's window."""
    if cache.window is None or cache.length + T <= cache.window:  # the last new query still sees column 0
        return _padded_causal_mask(key_mask, T) if key_mask is not None else None
    if key_mask is None:
        key_mask = torch.ones(1, cache.length + T, dtype=torch.bool, device=cache.key_mask.device)
    return _padded_causal_mask(key_mask, T, cache.window)


def _padded_causal_mask(key_mask: torch.Tensor, T: int, window: int | None = None) -> torch.Tensor:
    """key_mask [B, L] (False = padding) -> [B, 1, T, L]: causal over the last T positions, padding
    hidden, and with a window, keys `window` or more columns before the query too (a row's tokens
    are contiguous columns, so columns count positions). A padding query may always see itself, so no
    row is empty (an empty row gives NaN)."""
    L = key_mask.shape[1]
    causal = torch.ones(T, L, dtype=torch.bool, device=key_mask.device).tril(L - T)
    if window is not None:
        causal &= ~torch.ones(T, L, dtype=torch.bool, device=key_mask.device).tril(L - T - window)
    diagonal = torch.zeros(T, L, dtype=torch.bool, device=key_mask.device)
    diagonal[torch.arange(T), torch.arange(L - T, L)] = True
    return ((causal & key_mask[:, None, :]) | diagonal)[:, None]


def count_parameters(config: Config) -> dict[str, int]:
    """Exact parameter counts by name, from a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config)
    return {name: p.numel() for name, p in model.named_parameters()}


def parameter_breakdown(config: Config) -> list[tuple[str, int, int]]:
    """Rows of (part, parameters per unit, number of units); the totals add up to the model's count."""
    counts = count_parameters(config)
    kinds = config.layer_types

    def layer_part(i: int, prefix: str) -> int:
        return sum(n for k, n in counts.items() if k.startswith(f"model.layers.{i}.{prefix}"))

    rows: list[tuple[str, int, int]] = [("embedding", counts["model.embed_tokens.weight"], 1)]
    for kind, prefix, label in ((LINEAR, "linear_attn.", "Gated DeltaNet layer"),
                                (FULL, "self_attn.", "Gated Attention layer")):
        idx = [i for i, t in enumerate(kinds) if t == kind]
        if idx:
            rows.append((label, layer_part(idx[0], prefix), len(idx)))
    dense = [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]
    moe = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    if dense:
        rows.append(("SwiGLU MLP", layer_part(dense[0], "mlp."), len(dense)))
    if moe:  # the MoE block in its three parts; the shared expert's row includes its sigmoid gate
        E, I, k = config.num_experts, config.moe_intermediate_size, config.num_experts_per_tok
        parts = [(f"MoE router ({E} experts)", "mlp.gate."),
                 (f"MoE routed experts ({E} x {I} wide, {k} per token)", "mlp.experts."),
                 (f"MoE shared expert ({config.shared_expert_intermediate_size} wide) + gate", "mlp.shared_expert")]
        rows += [(label, layer_part(moe[0], prefix), len(moe)) for label, prefix in parts]
    norms = sum(n for k, n in counts.items() if k.endswith("layernorm.weight") or k == "model.norm.weight")
    rows.append(("norms (2 per layer + final)", norms, 1))
    if config.tie_word_embeddings:
        rows.append(("LM head (tied to the embedding)", 0, 1))
    else:
        rows.append(("LM head", counts["lm_head.weight"], 1))
    rest = sum(counts.values()) - sum(p * u for _, p, u in rows)
    if rest:
        rows.append(("other (MTP)", rest, 1))
    return rows


def active_parameters(config: Config) -> int:
    """Parameters used per token: all of them except the routed experts a token is not sent to. Every
    MoE block counts k of its E experts, wherever it is (the MTP block's too); dense layers
    (`mlp_only_layers`, `decoder_sparse_step`) count in full."""
    counts = count_parameters(config)
    total = sum(counts.values())
    routed = sum(n for name, n in counts.items() if ".mlp.experts." in name)
    if not routed:
        return total
    return total - routed + routed // config.num_experts * config.num_experts_per_tok
