"""A static KV cache, prefill into it, and a decode step with no host synchronisation, for `MoELlamaDecoder`.

The same LLaMA maths as transformers' `LlamaDecoderLayer` (RMSNorm, RoPE, SDPA attention, our top-1 MoE), run
on the layer's own modules, but with the keys and values in tensors preallocated once per request:

- `prefill` runs T new positions from absolute position `start` (0, or the length of a reused prefix), eagerly;
- `DecodeStep` runs one position whose token id and position live on the device, writes the next greedy id
  back into the token buffer and advances the position: nothing in it reads a tensor value on the host, so it
  can be replayed as a CUDA graph and compiled with `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine.modeling.language import MoELlamaDecoder


@dataclass
class StaticKV:
    """keys, values: (n_layers, 1, n_kv_heads, capacity, head_dim) in the decoder's dtype."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @classmethod
    def allocate(cls, llm: MoELlamaDecoder, capacity: int, *, device: torch.device, dtype: torch.dtype) -> StaticKV:
        cfg = llm.hf_config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, capacity, head_dim)
        return cls(keys=torch.zeros(shape, device=device, dtype=dtype),
                   values=torch.zeros(shape, device=device, dtype=dtype))

    def copy_prefix_from(self, other: StaticKV, n: int) -> None:
        """Copy the first n positions of `other` (another capacity) into this cache."""
        self.keys[:, :, :, :n].copy_(other.keys[:, :, :, :n])
        self.values[:, :, :, :n].copy_(other.values[:, :, :, :n])


def _attention(layer: nn.Module, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor,
               values: torch.Tensor, positions: torch.Tensor, n_ctx: int, mask: torch.Tensor | None) -> torch.Tensor:
    """h (1, T, C) normed → attention output (1, T, C); writes this step's keys/values at `positions` (T,).

    keys/values: one layer's (1, H_kv, S, D) cache; the first n_ctx positions are attended (masked by `mask`
    (1, 1, T, n_ctx) bool, or causally when mask is None).
    """
    attn = layer.self_attn
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)  # (1, H, T, D)
    k = attn.k_proj(h).view(shape).transpose(1, 2)  # (1, H_kv, T, D)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *rope)
    keys.index_copy_(2, positions, k)
    values.index_copy_(2, positions, v)
    gqa = q.shape[1] != keys.shape[1]
    out = nn.functional.scaled_dot_product_attention(
        q, keys[:, :, :n_ctx], values[:, :, :n_ctx], attn_mask=mask, is_causal=mask is None, scale=attn.scaling,
        enable_gqa=gqa)  # (1, H, T, D)
    out = out.transpose(1, 2).reshape(*h.shape[:-1], -1)
    return attn.o_proj(out)


def _layer_forward(layer: nn.Module, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor,
                   values: torch.Tensor, positions: torch.Tensor, n_ctx: int, mask: torch.Tensor | None,
                   expert_path: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer; returns (h, chosen experts (T,)). expert_path None = the prefill MoE (`forward`)."""
    h = h + _attention(layer, layer.input_layernorm(h), rope, keys, values, positions, n_ctx, mask)
    x = layer.post_attention_layernorm(h)
    if expert_path is None:
        y = layer.mlp(x)
        choice = layer.mlp.last_choice.reshape(-1)
    else:
        y, choice = layer.mlp.step(x.reshape(-1, x.shape[-1]), expert_path)
        y = y.view_as(x)
    return h + y, choice


@torch.no_grad()
def prefill(llm: MoELlamaDecoder, embeds: torch.Tensor, kv: StaticKV, *, start: int) -> torch.Tensor:
    """embeds (1, T, C) at absolute positions start..start+T-1 → post-norm hidden (1, T, C), keys/values cached.

    Positions [0, start) must already hold a valid prefix. Routing is left in `llm.routing()` as after a forward.
    """
    n_new = embeds.shape[1]
    n_ctx = start + n_new
    if n_ctx > kv.capacity:
        raise ValueError(f"{n_ctx} positions do not fit a cache of {kv.capacity}")
    positions = torch.arange(start, n_ctx, device=embeds.device)
    rope = llm.rotary_emb(embeds, positions[None])
    mask = None
    if start:  # the new rows see the whole prefix and, causally, each other
        mask = (torch.arange(n_ctx, device=embeds.device)[None, :] <= positions[:, None])[None, None]
    h = embeds
    for i, layer in enumerate(llm.layers):
        h, _ = _layer_forward(layer, h, rope, kv.keys[i], kv.values[i], positions, n_ctx, mask, None)
    return llm.norm(h)


class DecodeStep(nn.Module):
    """One greedy decoding position, entirely on the device.

    forward(token (1, 1) int64, pos (1,) int64, keys, values) runs `token` at position `pos`, writes its keys and
    values, then overwrites `token` with the greedy next id and adds 1 to `pos`. Returns the post-norm hidden
    state (1, C) that predicts the next token, the fp32 logits (V,) and the expert chosen in every layer (L,).
    """

    def __init__(self, *, llm: MoELlamaDecoder, lm_head: nn.Linear, expert_path: str = "gather") -> None:
        super().__init__()
        self.llm = llm
        self.lm_head = lm_head
        self.expert_path = expert_path

    def forward(self, token: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        llm = self.llm
        h = llm.embed_tokens(token)  # (1, 1, C)
        rope = llm.rotary_emb(h, pos[None])
        capacity = keys.shape[3]
        mask = (torch.arange(capacity, device=pos.device) <= pos)[None, None, None, :]  # (1, 1, 1, S)
        choices = []
        for i, layer in enumerate(llm.layers):
            h, choice = _layer_forward(layer, h, rope, keys[i], values[i], pos, capacity, mask, self.expert_path)
            choices.append(choice)
        h = llm.norm(h)[0]  # (1, C)
        logits = self.lm_head(h).float()[0]  # (V,)
        token.copy_(logits.argmax().view(1, 1))
        pos.add_(1)
        return h, logits, torch.cat(choices)
