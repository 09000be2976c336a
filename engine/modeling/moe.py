"""Token-level top-1 mixture of experts that replaces every LLaMA MLP in MedPLIB.

Same maths as DeepSpeed's `TopKGate(k=1)` + `MOELayer` in eval mode with capacity >= tokens (MedPLIB's
setting, so no token is dropped): logits = x·Wg in fp32, p = softmax(logits), e = argmax p, and
y = p[e] · expert_e(x). Unlike DeepSpeed, each token is dispatched to its own expert only.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class ExpertMLP(nn.Module):
    """LLaMA's SiLU-gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, *, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = ACT2FN["silu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C) -> (N, C)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Top1MoE(nn.Module):
    """MoE MLP: `router` Linear(hidden, E, bias=False) kept in fp32, `experts` ModuleList of ExpertMLP.

    After each forward, `last_choice` holds the chosen expert of every token, shape (B, T) int64, and
    `last_router_logits` the fp32 router logits (B, T, E): the engine reads them to report routing.
    """

    def __init__(self, *, hidden_size: int, intermediate_size: int, num_experts: int) -> None:
        super().__init__()
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(
            ExpertMLP(hidden_size=hidden_size, intermediate_size=intermediate_size) for _ in range(num_experts)
        )
        self.last_choice: torch.Tensor | None = None
        self.last_router_logits: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> (logits (N, E) fp32, chosen expert (N,) int64, its probability (N,) fp32)."""
        logits = nn.functional.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        weight, choice = probs.max(dim=-1)
        return logits, choice, weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # (N, C)
        logits, choice, weight = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            # The combine weight is cast to the activation dtype before the product, as DeepSpeed does.
            y = expert(x[rows]) * weight[rows].to(x.dtype).unsqueeze(-1)
            out.index_copy_(0, rows, y)
        self.last_choice = choice.reshape(shape[:-1])
        self.last_router_logits = logits.reshape(*shape[:-1], -1)
        return out.reshape(shape)
