"""LLaMA decoder on transformers building blocks, with every MLP replaced by a top-1 MoE.

We keep transformers' `LlamaDecoderLayer` (attention, RMSNorm, RoPE) and swap its `mlp` for `Top1MoE`. The
forward takes input embeddings (image and region features are spliced in by the caller) and returns the
post-norm last hidden states, which MedPLIB needs for its `<SEG>` embedding.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from engine.config import LlamaSizes, MoESizes
from engine.modeling.moe import Top1MoE


def to_hf_llama_config(llm: LlamaSizes) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        rms_norm_eps=llm.rms_norm_eps,
        max_position_embeddings=llm.max_position_embeddings,
        rope_theta=llm.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


class MoELlamaDecoder(nn.Module):
    """`embed_tokens`, `layers` (LlamaDecoderLayer with `mlp` = Top1MoE), `norm`, and the rotary embedding."""

    def __init__(self, *, llm: LlamaSizes, moe: MoESizes) -> None:
        super().__init__()
        hf = to_hf_llama_config(llm)
        self.embed_tokens = nn.Embedding(llm.vocab_size, llm.hidden_size, padding_idx=None)
        self.layers = nn.ModuleList()
        for i in range(llm.num_layers):
            layer = LlamaDecoderLayer(hf, layer_idx=i)
            layer.mlp = Top1MoE(
                hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size, num_experts=moe.num_experts
            )
            self.layers.append(layer)
        self.norm = LlamaRMSNorm(llm.hidden_size, eps=llm.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(hf)
        self.hf_config = hf

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.hf_config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (B, T, C)
        *,
        cache: DynamicCache | None = None,
        start: int = 0,
        return_layers: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run T new positions starting at absolute position `start` (0 for a fresh prefill).

        Returns the post-norm hidden states (B, T, C) and, when `return_layers`, each layer's output.
        A prefill with no cache is causal; a step with a cache attends to everything cached (T must be 1
        then, or the cache empty), which is all greedy decoding needs.
        """
        if cache is not None and cache.get_seq_length() and inputs_embeds.shape[1] != 1:
            raise ValueError("with a non-empty cache, feed one position at a time")
        positions = torch.arange(start, start + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        rope = self.rotary_emb(inputs_embeds, positions)
        h = inputs_embeds
        layer_outputs: list[torch.Tensor] = []
        for layer in self.layers:
            h = layer(h, attention_mask=None, position_ids=positions, cache=cache,
                      use_cache=cache is not None, position_embeddings=rope)
            if return_layers:
                layer_outputs.append(h)
        return self.norm(h), layer_outputs

    def routing(self) -> list[torch.Tensor]:
        """Per layer, the expert chosen for every position of the last forward: list of (B, T) int64."""
        return [layer.mlp.last_choice for layer in self.layers]

    def router_logits(self) -> list[torch.Tensor]:
        return [layer.mlp.last_router_logits for layer in self.layers]
