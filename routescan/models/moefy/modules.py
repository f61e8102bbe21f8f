"""The MoE block a MoEfied model computes with: a router, stacked experts and an optional shared expert.

The modules follow transformers 5's MoE shape on purpose (a router returning
``(logits, weights, indices)``, an experts module called with ``(hidden, indices, weights)`` that holds
stacked ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` weights) so the adapter registry and both
collectors treat a MoEfied model like any transformers MoE. The experts loop over the experts that
received tokens, one set of kernels per expert, which is the eager path whose launch sizes follow the
per-expert token counts.

MoEfication splits a dense FFN's neurons into experts, so the dense output is the *unweighted* sum of
every expert's output: the router only chooses, it does not scale (weights are all 1). With ``k = E``
the block is the dense FFN, up to float summation order.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN


class MoEfiedRouter(nn.Module):
    """Scores each expert's contribution from the FFN input and keeps the top-k."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, router_hidden: int = 0) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_hidden = router_hidden
        if router_hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(hidden, router_hidden), nn.SiLU(), nn.Linear(router_hidden, num_experts)
            )
        else:
            # No bias: stock MoE checkpoints (Qwen2-MoE, Mixtral) hold a bias-free linear gate, and the
            # exported model must route exactly as this one does (routescan.models.moefy.export).
            self.net = nn.Linear(hidden, num_experts, bias=False)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.net(hidden)
        _, indices = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.ones(indices.shape, dtype=hidden.dtype, device=hidden.device)
        return logits, weights, indices


class MoEfiedExperts(nn.Module):
    """``num_experts`` gated FFN slices with stacked weights, computed expert by expert.

    ``expert_scope``, when set, is entered around each expert's kernels: the CUPTI collector tags each
    expert's launches through it, exactly, instead of splitting the loop's kernel stream afterwards.
    """

    has_gate = True
    is_transposed = False
    expert_scope: Callable[[int], AbstractContextManager] | None = None
    # "eager": one set of kernels per hit expert (launch sizes follow routing; what the GPU collectors
    # need). "masked_dense": every expert in two large matmuls, unchosen ones zeroed: the same output
    # up to float summation order, several times faster on CPU, for emulated collection.
    implementation = "eager"

    def __init__(self, num_experts: int, hidden: int, intermediate: int, activation: str) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.activation = activation
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.act_fn = ACT2FN[activation]

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.implementation == "masked_dense":
            return self._masked_dense(hidden, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden)
        with torch.no_grad():
            # [E, k, tokens]: which (slot, token) pairs went to each expert
            mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = torch.nonzero(mask.sum(dim=(-1, -2)) > 0).flatten().tolist()
        scope = self.expert_scope
        for expert in hit:
            with scope(expert) if scope is not None else nullcontext():
                slot, token = torch.where(mask[expert])
                gate, up = F.linear(hidden[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
                y = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
                out.index_add_(0, token, y * top_k_weights[token, slot, None].to(y.dtype))
        return out

    def _masked_dense(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        num, two_i, width = self.gate_up_proj.shape
        gate_up = F.linear(hidden, self.gate_up_proj.reshape(num * two_i, width)).view(tokens, num, two_i)
        gate, up = gate_up.chunk(2, dim=-1)
        # routing weight per (token, expert); 0 for experts the token did not choose
        weight = torch.zeros(tokens, num, dtype=hidden.dtype, device=hidden.device)
        weight.scatter_add_(1, top_k_index, top_k_weights.to(hidden.dtype))
        inner = (self.act_fn(gate) * up) * weight.unsqueeze(-1)
        down = self.down_proj.permute(1, 0, 2).reshape(self.down_proj.shape[1], -1)  # [H, E*I]
        return F.linear(inner.reshape(tokens, -1), down)


class SharedExpert(nn.Module):
    """The always-on slice of the FFN: the neurons every token uses most."""

    def __init__(self, hidden: int, intermediate: int, activation: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = ACT2FN[activation]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))


class MoEfiedMLP(nn.Module):
    """Drop-in replacement for a gated dense MLP (``[batch, seq, hidden] -> same``)."""

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        expert_intermediate: int,
        top_k: int,
        activation: str,
        *,
        shared_intermediate: int = 0,
        router_hidden: int = 0,
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.router = MoEfiedRouter(hidden, num_experts, top_k, router_hidden)
        self.experts = MoEfiedExperts(num_experts, hidden, expert_intermediate, activation)
        self.shared_expert = (
            SharedExpert(hidden, shared_intermediate, activation) if shared_intermediate else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, self.hidden)
        _, weights, indices = self.router(flat)
        out = self.experts(flat, indices, weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.reshape(shape)
