"""Qwen3-Next's sparse mixture of experts, as transformers computes it.

A router (`gate`, H -> E, no bias) scores every token; softmax in float32, top-k, renormalised when
`norm_topk_prob`; the chosen SwiGLU experts run only on the tokens routed to them; a shared SwiGLU
expert, scaled by sigmoid(shared_expert_gate(x)), is added for every token.

Expert weights are stacked the way transformers 5 keeps them in memory:
`experts.gate_up_proj [E, 2I, H]` (gate rows first, then up) and `experts.down_proj [E, H, I]`
(`huggingface.py` converts to the per-expert names stored on disk).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config
from .kernels.linear import (computed_once, inference_linear, inference_weight, int8_linear, is_int8, quantize_rows,
                             step_linear)


class TopKRouter(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor):
        """x [N, H] -> router logits [N, E], routing weights [N, k], chosen experts [N, k]."""
        logits = step_linear(x, self.weight)  # F.linear; a sum in a compiled step of a few rows
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), experts


class Experts(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; experts, weights [N, k] -> [N, H]: for each token, the sum over its k chosen experts
        of weight * SwiGLU_e(x).

        The N*k (token, expert) assignments are sorted by expert once, so each expert runs one pair of
        matmuls on exactly the rows routed to it, and an expert no token chose costs nothing. The router
        gets its gradient through `weights`, as in transformers; the choice itself is not differentiable.
        """
        k = experts.shape[1]
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # assignments grouped by expert, tokens in order within each
        token = order // k  # the token of each sorted assignment
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # rows per expert (one host sync)
        # unbind, not [e]: each indexing would cost a full-size zero gradient [E, ...] in the backward
        gate_up_proj, down_proj = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        outs = []
        for e, rows in enumerate(x.index_select(0, token).split(counts)):
            if len(rows):
                gate, up = F.linear(rows, gate_up_proj[e]).chunk(2, dim=-1)
                outs.append(F.linear(F.silu(gate) * up, down_proj[e]))
        if not outs:  # no tokens at all
            return torch.zeros_like(x)
        out = torch.cat(outs) * weights.flatten()[order, None]
        # under autocast the matmuls run in bf16 while x is float32: add in x's dtype, as transformers does
        return x.new_zeros(x.shape).index_add(0, token, out.to(x.dtype))


    def step(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`forward` for the few rows of a decoding step (inference only), without looping over the E
        experts: for each row and each of its k choices, the chosen expert's weights are selected (views,
        no copy) and multiplied. The same operations whatever the routing, so a compiled step never
        recompiles for it: a float32 CPU step gathers the weights inside its products (`_traced_step`),
        others read the expert ids as data (one host read per step). Sums in the order of the choices:
        equal to `forward` up to float32 rounding. Eagerly, with more (row, choice) pairs than experts (a
        short prompt read through the step path, a large batch), `_padded_step` or `forward` is cheaper."""
        N, k = experts.shape
        if torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32:
            return self._traced_step(x, experts, weights)
        gate_up, down = self._step_weights()  # (eagerly: also makes the int8 copy a compiled step reads)
        if N * k > self.num_experts:  # a prompt read through the step path, a large batch
            return self._padded_step(x, experts, weights) if N * k <= 8 * self.num_experts else self.forward(
                x, experts, weights)
        chosen = experts.tolist()
        rows = []
        for n in range(N):
            out = None
            for j in range(k):
                e = chosen[n][j]
                torch._check(e >= 0)  # for torch.export: a valid index, read as data
                torch._check(e < self.num_experts)
                gate, up = gate_up(x[n:n + 1], e).chunk(2, dim=-1)
                y = down(F.silu(gate) * up, e) * weights[n, j].to(x.dtype)
                out = y if out is None else out + y
            rows.append(out)
        return torch.cat(rows)

    def _padded_step(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`forward` for inference where a few rows land on each expert: each expert's rows laid out in
        one padded block [E, C, H] (C: the most rows an expert got), so that every expert multiplies in
        two batched products instead of two small ones each, whose fixed costs dominate at a few rows
        (tiny_10m_moe, 32 tokens: 0.9 ms a layer instead of 1.8; 256 tokens: 3.7 against 3.1)."""
        k = experts.shape[1]
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        expert, token = flat[order], order // k
        counts = torch.bincount(flat, minlength=self.num_experts)
        slot = torch.arange(flat.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]
        rows = x.new_zeros(self.num_experts, int(counts.max()), x.shape[1])
        rows[expert, slot] = x[token]
        gate, up = torch.bmm(rows, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, self.down_proj.transpose(1, 2))[expert, slot]
        out = out * weights.flatten()[order, None]
        return x.new_zeros(x.shape).index_add(0, token, out.to(x.dtype))

    def _traced_step(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`step` as a compiled CPU step computes it: each (row, choice) multiplies by its expert's
        rows gathered in the product's own loop (the ids read as data by the kernel, not by the host:
        no graph break), as float32 sums (see `kernels.linear.traced_matvec`; int8 weights times their
        row scales)."""
        N, k = experts.shape
        chosen = experts.reshape(-1)
        gate_up_w, gate_up_scale, down_w, down_scale = self._decoding_weights()

        def product(rows: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
            y = (computed_once(rows)[:, None] * w[chosen]).sum(-1)  # row i times expert chosen[i]
            return y if scale is None else y * scale[chosen].float()

        gate, up = product(x.repeat_interleave(k, dim=0), gate_up_w, gate_up_scale).chunk(2, dim=-1)
        y = product(F.silu(gate) * up, down_w, down_scale) * weights.reshape(-1, 1).to(x.dtype)
        return y.view(N, k, -1).sum(1)

    def _decoding_weights(self) -> tuple:
        """(gate_up, its row scales, down, its row scales): the float weights and None, or their int8
        copy. Whether the weights are int8 is decided eagerly, with the copy (`inference_weight`): in a
        compiled step they are the program's arguments, without their int8 mark."""
        params = (self.gate_up_proj, self.down_proj)

        def build():
            if not is_int8(params):
                return None
            (q_gu, s_gu), (q_d, s_d) = quantize_rows(self.gate_up_proj), quantize_rows(self.down_proj)
            return q_gu, s_gu.to(torch.bfloat16), q_d, s_d.to(torch.bfloat16)
        int8 = inference_weight(self, "_int8", params, build)
        return (self.gate_up_proj, None, self.down_proj, None) if int8 is None else int8

    def _step_weights(self):
        """(gate_up(x, e), down(x, e)): expert e's products, on float weights or on their int8 copy."""
        gate_up_w, gate_up_scale, down_w, down_scale = self._decoding_weights()
        if gate_up_scale is None:
            return (lambda x, e: step_linear(x, gate_up_w[e])), (lambda x, e: step_linear(x, down_w[e]))
        return ((lambda x, e: int8_linear(x, gate_up_w[e], gate_up_scale[e])),
                (lambda x, e: int8_linear(x, down_w[e], down_scale[e])))


class SharedExpert(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """The same for decoding (inference only), gate and up as one matmul."""
        gate_up = inference_linear(self, "_gate_up", (self.gate_proj.weight, self.up_proj.weight),
                                   lambda: torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        gate, up = gate_up(x).chunk(2, dim=-1)
        return inference_linear(self, "_down", (self.down_proj.weight,))(F.silu(gate) * up)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate = TopKRouter(config)
        self.experts = Experts(config)
        self.shared_expert = SharedExpert(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        for p in (self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj):
            p.normal_(0.0, std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> (output [B, T, H], router logits [B*T, E])."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        logits, weights, experts = self.gate(flat)
        out = self.experts(flat, experts, weights)
        out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(B, T, H), logits

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` for a decoding step, x [B, T, H] -> [B, T, H], as a fixed sequence of operations
        (`Experts.step`); no router logits. Inference only."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        _, weights, experts = self.gate(flat)
        out = self.experts.step(flat, experts, weights)
        shared_gate = torch.sigmoid(step_linear(flat, self.shared_expert_gate.weight))
        out = out + shared_gate * self.shared_expert.step(flat)
        return out.reshape(B, T, H)


def load_balancing_loss(router_logits: list[torch.Tensor], config: Config,
                        pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over all MoE layers, as transformers computes it:
    E * sum_e (fraction of top-k assignments to e) * (mean router probability of e); padding excluded.

    router_logits: one [B*T, E] tensor per MoE layer; pad_mask [B, T] (1 = token, 0 = padding) or None.
    It is k for perfectly balanced routing (and for a router that cannot tell experts apart)."""
    E, k = config.num_experts, config.num_experts_per_tok
    counts = torch.zeros(E, dtype=torch.float32, device=router_logits[0].device)
    prob_sum = torch.zeros_like(counts)
    rows = 0.0
    weight = None if pad_mask is None else pad_mask.reshape(-1).float()
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, k, dim=-1).indices
        w = torch.ones(chosen.shape[0], device=probs.device) if weight is None else weight
        counts = counts.index_add(0, chosen.flatten(), w.repeat_interleave(k))
        prob_sum = prob_sum + (probs * w[:, None]).sum(0)
        rows = rows + w.sum()
    return (counts / rows * prob_sum / rows).sum() * E
