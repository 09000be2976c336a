"""Token-level top-1 mixture of experts that replaces every LLaMA MLP in MedPLIB.

Same maths as DeepSpeed's `TopKGate(k=1)` + `MOELayer` in eval mode with capacity >= tokens (MedPLIB's
setting, so no token is dropped): logits = x·Wg in fp32, p = softmax(logits), e = argmax p, and
y = p[e] · expert_e(x). Unlike DeepSpeed, each token is dispatched to its own expert only.

`forward` (prefill, any number of tokens) finds each expert's rows with `.nonzero()`, a host sync. `step`
(decoding, a handful of tokens) picks the expert on the device instead, for a decode step that never waits on
the host and can be captured in a CUDA graph or compiled with `fullgraph=True`.
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


EXPERT_PATHS = ("gather", "grouped", "select")


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
        self._stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

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

    # ---- decoding: the expert is picked on the device ---------------------------------------------------
    @torch.no_grad()
    def stack_experts(self) -> bool:
        """Re-home the experts' weights into stacked (E, I, C) / (E, I, C) / (E, C, I) tensors, in place.

        Each expert's Linear keeps a view into the stacked tensor, so no memory is added and loading, saving
        and `forward` are unchanged. Returns False (nothing done) when the experts are not plain Linears
        (bitsandbytes 8-/4-bit layers): `step` then needs path "select".
        """
        linears = [(e.gate_proj, e.up_proj, e.down_proj) for e in self.experts]
        if any(type(lin) is not nn.Linear or lin.weight.is_meta for trio in linears for lin in trio):
            self._stacked = None  # e.g. swapped for quantised layers since the last call
            return False
        if self._stacked is not None and all(
                trio[j].weight.data_ptr() == self._stacked[j][e].data_ptr()
                for e, trio in enumerate(linears) for j in range(3)):
            return True
        stacked = []
        for j in range(3):
            weight = torch.stack([trio[j].weight.detach() for trio in linears])  # (E, out, in)
            for e, trio in enumerate(linears):
                trio[j].weight = nn.Parameter(weight[e], requires_grad=False)  # a view: storage shared
            stacked.append(weight)
        self._stacked = (stacked[0], stacked[1], stacked[2])
        return True

    def step(self, x: torch.Tensor, path: str = "gather") -> tuple[torch.Tensor, torch.Tensor]:
        """x (1, C) one decoding position -> (y (1, C), chosen expert (1,) int64); no host synchronisation.

        path "gather": index the stacked weights with the device-side choice (bit-identical to `forward` in
        fp32; a copy of one expert's weights in eager mode, fused away by torch.compile);
        "grouped": `torch._grouped_mm` with device-side group offsets (reads only the chosen expert);
        "select": run every expert and keep the chosen one with `torch.where` (works for quantised layers).
        """
        _logits, choice, weight = self.route(x)
        if path == "select":
            y = self.experts[0](x)
            for e in range(1, len(self.experts)):
                y = torch.where((choice == e)[:, None], self.experts[e](x), y)
        else:
            if self._stacked is None:
                raise RuntimeError(f"call stack_experts() before step(path={path!r})")
            y = self._stacked_mlp(x, choice, path)
        return y * weight.to(x.dtype).unsqueeze(-1), choice

    def _stacked_mlp(self, x: torch.Tensor, choice: torch.Tensor, path: str) -> torch.Tensor:
        assert self._stacked is not None
        gate, up, down = self._stacked  # (E, I, C), (E, I, C), (E, C, I)
        act = self.experts[0].act
        if path == "grouped":
            # Group e holds rows [offs[e-1], offs[e]): the one token sits in the group of its expert.
            offs = (torch.arange(gate.shape[0], device=x.device) >= choice).to(torch.int32)  # (E,)
            h = act(torch.ops.aten._grouped_mm(x, gate.transpose(-2, -1), offs))
            h = h * torch.ops.aten._grouped_mm(x, up.transpose(-2, -1), offs)
            return torch.ops.aten._grouped_mm(h, down.transpose(-2, -1), offs)
        if path != "gather":
            raise ValueError(f"unknown expert path {path!r}: one of {EXPERT_PATHS}")
        g, u, d = (w.index_select(0, choice)[0] for w in (gate, up, down))
        return nn.functional.linear(act(nn.functional.linear(x, g)) * nn.functional.linear(x, u), d)
