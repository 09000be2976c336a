"""Top-1 MoE routing maths against a hand computation, and dispatch to the chosen expert only."""

from __future__ import annotations

import torch
from torch import nn

from engine.modeling.moe import Top1MoE


def _moe() -> Top1MoE:
    torch.manual_seed(0)
    moe = Top1MoE(hidden_size=4, intermediate_size=8, num_experts=2)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    return moe


def test_output_is_chosen_expert_times_its_softmax_probability() -> None:
    moe = _moe()
    x = torch.tensor([[[2.0, 0.5, 0.0, 1.0], [0.0, 3.0, 1.0, 0.0]]])  # (B=1, T=2, C=4)
    y = moe(x)
    # token 0: logits (2, 0.5) → expert 0 with p = 1 / (1 + e^-1.5); token 1: logits (0, 3) → expert 1
    p0 = 1.0 / (1.0 + torch.exp(torch.tensor(-1.5)))
    p1 = 1.0 / (1.0 + torch.exp(torch.tensor(-3.0)))
    torch.testing.assert_close(y[0, 0], moe.experts[0](x[0, :1])[0] * p0)
    torch.testing.assert_close(y[0, 1], moe.experts[1](x[0, 1:])[0] * p1)
    assert moe.last_choice.tolist() == [[0, 1]]
    torch.testing.assert_close(moe.last_router_logits[0], torch.tensor([[2.0, 0.5], [0.0, 3.0]]))


def test_router_runs_in_fp32_for_bf16_activations() -> None:
    moe = _moe().to(torch.bfloat16)
    moe.router.float()
    x = torch.randn(1, 5, 4).to(torch.bfloat16)
    y = moe(x)
    assert y.dtype == torch.bfloat16
    assert moe.last_router_logits.dtype == torch.float32


def test_each_token_runs_only_its_own_expert() -> None:
    moe = _moe()
    seen: list[int] = [0, 0]
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda _m, inp, _o, e=e: seen.__setitem__(e, seen[e] + inp[0].shape[0]))
    x = torch.tensor([[[5.0, 0, 0, 0], [4.0, 0, 0, 0], [0, 6.0, 0, 0]]])
    moe(x)
    assert seen == [2, 1]  # no wasted compute: 3 tokens, 3 expert rows in total


def test_an_unused_expert_is_skipped() -> None:
    moe = _moe()
    calls = []
    moe.experts[1].register_forward_hook(lambda *_: calls.append(1))
    moe(torch.tensor([[[5.0, 0, 0, 0]]]))
    assert calls == []


def test_step_picks_the_expert_on_the_device_and_matches_forward() -> None:
    moe = _moe()
    assert moe.stack_experts()
    x = torch.tensor([[5.0, 0, 1.0, 0]])  # expert 0
    for path in ("gather", "grouped", "select"):
        y, choice = moe.step(x, path)
        assert choice.tolist() == [0]
        torch.testing.assert_close(y, moe(x[None])[0])
    y, choice = moe.step(torch.tensor([[0.0, 5.0, 0, 1.0]]), "gather")
    assert choice.tolist() == [1]


def test_stacking_keeps_the_expert_weights_without_copying_them() -> None:
    moe = _moe()
    before = [e.up_proj.weight.clone() for e in moe.experts]
    moe.stack_experts()
    for e, expert in enumerate(moe.experts):
        assert torch.equal(expert.up_proj.weight, before[e])
        assert expert.up_proj.weight.data_ptr() == moe._stacked[1][e].data_ptr()


def test_swapped_expert_layers_are_restacked_not_stale() -> None:
    """Bug: stacked weights made before quantisation (or any swap of the experts' Linears) were still used by
    `step`, which then ignored the new layers. `stack_experts` now checks the views and stacks again."""
    moe = _moe()
    moe.stack_experts()
    torch.manual_seed(1)
    moe.experts[0].gate_proj = nn.Linear(4, 8, bias=False)
    assert moe.stack_experts()
    x = torch.tensor([[5.0, 0, 1.0, 0]])
    torch.testing.assert_close(moe.step(x, "gather")[0], moe(x[None])[0])
    moe.experts[1].down_proj = SubclassedLinear(8, 4, bias=False)  # e.g. a quantised layer
    assert not moe.stack_experts() and moe._stacked is None


class SubclassedLinear(nn.Linear):
    pass
