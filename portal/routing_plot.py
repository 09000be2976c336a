"""Plot which MoE expert handled each generated token in each layer (Answer.experts)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from portal import texts

# Okabe-Ito colours, one per expert (MedPLIB-7b-2e has two experts).
EXPERT_COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


def routing_figure(experts: Sequence[Sequence[int]], tokens: Sequence[str], n_experts: int) -> go.Figure:
    """Heatmap of experts[layer][t] (layers x generated tokens); token strings label the x axis.

    Raises ValueError when the token labels do not match the number of routed tokens.
    """
    grid = np.asarray(experts, dtype=np.int64).reshape(len(experts), -1)  # (L, T)
    if grid.shape[1] != len(tokens):
        raise ValueError(f"{grid.shape[1]} routed tokens but {len(tokens)} token labels")
    n_experts = max(1, n_experts)
    labels = [f"{i}: {tok!r}" for i, tok in enumerate(tokens)]
    figure = go.Figure(
        go.Heatmap(
            z=grid,
            x=labels,
            y=[f"layer {i}" for i in range(grid.shape[0])],
            zmin=-0.5,
            zmax=n_experts - 0.5,
            colorscale=_discrete_scale(n_experts),
            colorbar={"title": "expert", "tickvals": list(range(n_experts))},
            hovertemplate="%{y}, token %{x}: expert %{z}<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    figure.update_layout(
        title=texts.ROUTING_TITLE,
        xaxis={"title": "generated token", "tickangle": -45},
        yaxis={"title": "MoE layer", "autorange": "reversed"},
        margin={"l": 60, "r": 20, "t": 40, "b": 80},
        height=max(240, 24 * grid.shape[0] + 140),
    )
    return figure


def _discrete_scale(n: int) -> list[list[float | str]]:
    """A stepped colorscale: expert k gets one flat colour band."""
    scale: list[list[float | str]] = []
    for k in range(n):
        color = EXPERT_COLORS[k % len(EXPERT_COLORS)]
        scale += [[k / n, color], [(k + 1) / n, color]]
    return scale


def expert_shares(experts: Sequence[Sequence[int]], n_experts: int) -> list[float]:
    """Fraction of (layer, token) routing decisions that went to each expert."""
    flat = np.asarray(experts, dtype=np.int64).ravel()
    if flat.size == 0:
        return [0.0] * n_experts
    return [float((flat == k).mean()) for k in range(n_experts)]
