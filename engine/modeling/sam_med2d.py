"""SAM-Med2D (SAM ViT-B with adapters, 256 px) as MedPLIB uses it: image encoder, prompt encoder, mask decoder.

Maths from facebookresearch/segment-anything and OpenGVLab/SAM-Med2D (Apache-2.0), rewritten; parameter
names follow the released layout (`model.visual_model.*` minus the prefix) so checkpoints load strictly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENCODER_LN_EPS = 1e-6  # ViT blocks, neck and every LayerNorm2d
ADAPTER_LN_EPS = 1e-5  # SAM-Med2D builds the adapter norm with the nn.LayerNorm default, not 1e-6
DECODER_LN_EPS = 1e-5  # TwoWayTransformer norms (nn.LayerNorm default)


@dataclass(frozen=True)
class SamMed2DConfig:
    """Sizes of SAM-Med2D. Defaults are the ViT-B at 256 px that MedPLIB-7b-2e ships (a 16x16 token grid)."""

    image_size: int = 256
    vit_patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    encoder_adapter: bool = True
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256

    # Constants hard-coded in the reference builder (`_build_sam`); not configurable.
    mlp_ratio: ClassVar[int] = 4
    num_multimask_outputs: ClassVar[int] = 3
    iou_head_depth: ClassVar[int] = 3
    attention_downsample_rate: ClassVar[int] = 2

    @property
    def out_chans(self) -> int:
        """Channels of the image embedding (= prompt_embed_dim)."""
        return self.prompt_embed_dim

    @property
    def grid_size(self) -> int:
        """Side of the image-embedding grid in tokens (256 / 16 = 16)."""
        return self.image_size // self.vit_patch_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamMed2DConfig:
        """Build from a dict with exactly the field names (e.g. `tiny_sam_config.json`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted(names - set(d))
        if unknown:
            raise ValueError(f"unknown SAM-Med2D config key(s) {unknown}; valid keys are {sorted(names)}")
        if missing:
            raise ValueError(f"SAM-Med2D config is missing key(s) {missing}; give all of {sorted(names)}")
        d = dict(d, encoder_global_attn_indexes=tuple(d["encoder_global_attn_indexes"]))
        return cls(**d)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"SamMed2DConfig.{f.name} must be positive, got {value}")
        self._check_divisible("image_size", "vit_patch_size")
        self._check_divisible("encoder_embed_dim", "encoder_num_heads")
        self._check_divisible("mask_in_chans", 4)
        self._check_divisible("prompt_embed_dim", 8)  # output upscaling goes to dim // 8
        inner = self.prompt_embed_dim // self.attention_downsample_rate  # width of the cross attentions
        if inner % self.decoder_num_heads:
            raise ValueError(f"prompt_embed_dim / 2 = {inner} must be divisible by decoder_num_heads")
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(f"encoder_global_attn_indexes {bad} lie outside 0..{self.encoder_depth - 1}")

    def _check_divisible(self, name: str, by: str | int) -> None:
        divisor = by if isinstance(by, int) else getattr(self, by)
        if getattr(self, name) % divisor:
            raise ValueError(f"SamMed2DConfig.{name}={getattr(self, name)} must be divisible by {by}")


# ----------------------------------------------------------------------------- shared pieces


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, *, num_channels: int, eps: float = ENCODER_LN_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """lin1 -> act -> lin2 on the last axis."""

    def __init__(self, *, dim: int, hidden_dim: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, dim)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim)."""
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (hypernetworks and IoU head)."""

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        """(..., input_dim) -> (..., output_dim)."""
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


# ----------------------------------------------------------------------------- image encoder


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nW, window, window, C), zero-padding H and W up to multiples of `window`."""
    b, h, w, c = x.shape
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> Tensor:
    """Inverse of `window_partition`: (B * nW, window, window, C) -> (B, H, W, C)."""
    (hp, wp), (h, w) = padded, size
    b = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)[:, :h, :w, :]


def rel_pos_table(size: int, rel_pos: Tensor) -> Tensor:
    """(2*size-1, C) table -> (size, size, C) embeddings of query-key offsets (equal q and k sizes only)."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(
            f"rel-pos table has {rel_pos.shape[0]} rows, expected {2 * size - 1} for {size} tokens"
        )
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + size - 1]


class EncoderAttention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative positions (MViTv2)."""

    def __init__(self, *, dim: int, num_heads: int, input_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size - 1, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C), H == W == input_size."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)  # (B*nH, HW, d) each
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*nH, HW, HW)
        attn = self._add_rel_pos(attn, q, h, w).softmax(dim=-1)
        x = (attn @ v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)

    def _add_rel_pos(self, attn: Tensor, q: Tensor, h: int, w: int) -> Tensor:
        rh, rw = rel_pos_table(h, self.rel_pos_h), rel_pos_table(w, self.rel_pos_w)  # (h, h, d), (w, w, d)
        r_q = q.reshape(q.shape[0], h, w, -1).to(rh.dtype)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
        attn = attn.view(-1, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
        return attn.view(-1, h * w, h * w)


class Adapter(nn.Module):
    """SAM-Med2D adapter: channel attention, then a stride-2 conv / transposed-conv spatial branch."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        hidden = dim // 4
        self.norm = nn.LayerNorm(dim, eps=ADAPTER_LN_EPS)
        self.channel = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False), nn.Sigmoid()
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C); H and W even."""
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
        gate = self.channel(x.mean(dim=(2, 3)))[:, :, None, None]  # (B, C, 1, 1)
        x = x + self.spatial(gate * x)
        return self.norm(x.permute(0, 2, 3, 1))


class EncoderBlock(nn.Module):
    """ViT block: windowed (window_size > 0) or global attention, MLP, and the adapter beside the MLP."""

    def __init__(
        self, *, dim: int, num_heads: int, mlp_ratio: int, window_size: int, grid: int, adapter: bool
    ):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=ENCODER_LN_EPS)
        self.attn = EncoderAttention(dim=dim, num_heads=num_heads, input_size=window_size or grid)
        self.norm2 = nn.LayerNorm(dim, eps=ENCODER_LN_EPS)
        self.mlp = MLPBlock(dim=dim, hidden_dim=dim * mlp_ratio, act=nn.GELU)
        self.Adapter = Adapter(dim=dim) if adapter else None

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = x + self._attend(self.norm1(x))
        x_norm = self.norm2(x)
        out = x + self.mlp(x_norm)
        return out if self.Adapter is None else out + self.Adapter(x_norm)

    def _attend(self, x: Tensor) -> Tensor:
        if not self.window_size:
            return self.attn(x)
        h, w = x.shape[1:3]
        windows, padded = window_partition(x, self.window_size)
        return window_unpartition(self.attn(windows), self.window_size, padded, (h, w))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, 3, S, S) -> (B, S/p, S/p, C)."""

    def __init__(self, *, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM-Med2D ViT: normalised (B, 3, S, S) pixels -> (B, out_chans, S/16, S/16) image embedding."""

    def __init__(self, *, config: SamMed2DConfig) -> None:
        super().__init__()
        c, g = config.encoder_embed_dim, config.grid_size
        self.patch_embed = PatchEmbed(patch_size=config.vit_patch_size, embed_dim=c)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, c))
        self.blocks = nn.ModuleList(
            EncoderBlock(
                dim=c,
                num_heads=config.encoder_num_heads,
                mlp_ratio=config.mlp_ratio,
                window_size=0 if i in config.encoder_global_attn_indexes else config.window_size,
                grid=g,
                adapter=config.encoder_adapter,
            )
            for i in range(config.encoder_depth)
        )
        out = config.out_chans
        self.neck = nn.Sequential(
            nn.Conv2d(c, out, kernel_size=1, bias=False),
            LayerNorm2d(num_channels=out),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(num_channels=out),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, out_chans, S/16, S/16)."""
        x = self.patch_embed(x) + self.pos_embed  # (B, g, g, C)
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------- prompt encoder


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of 2-D positions; the gaussian matrix is a persistent buffer (it is in checkpoints)."""

    def __init__(self, *, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def encode(self, coords: Tensor) -> Tensor:
        """(..., 2) xy in [0, 1] -> (..., 2 * num_pos_feats), always float32."""
        coords = (2 * coords.float() - 1) @ self.positional_encoding_gaussian_matrix.float()
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> Tensor:
        """Encoding of pixel centres of an (h, w) grid -> (2 * num_pos_feats, h, w) float32."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # (h, w, 2) xy
        return self.encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: Tensor, image_size: tuple[int, int]) -> Tensor:
        """(B, N, 2) xy pixels in an image of (h, w) -> (B, N, 2 * num_pos_feats) float32."""
        scale = torch.tensor([image_size[1], image_size[0]], device=coords.device, dtype=torch.float32)
        return self.encode(coords.float() / scale)


class PromptEncoder(nn.Module):
    """Encodes points, boxes, masks and (MedPLIB) `<SEG>` text embeddings into sparse and dense prompts."""

    def __init__(self, *, config: SamMed2DConfig) -> None:
        super().__init__()
        dim, chans, g = config.prompt_embed_dim, config.mask_in_chans, config.grid_size
        self.embed_dim = dim
        self.image_embedding_size = (g, g)
        self.input_image_size = (config.image_size, config.image_size)
        self.pe_layer = PositionEmbeddingRandom(num_pos_feats=dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))  # neg, pos, box corners
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(num_channels=chans // 4),
            nn.GELU(),
            nn.Conv2d(chans // 4, chans, kernel_size=2, stride=2),
            LayerNorm2d(num_channels=chans),
            nn.GELU(),
            nn.Conv2d(chans, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def get_dense_pe(self) -> Tensor:
        """Positional encoding of the image-embedding grid: (1, C, h, w) float32."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def forward(
        self,
        *,
        points: tuple[Tensor, Tensor] | None = None,
        boxes: Tensor | None = None,
        masks: Tensor | None = None,
        text_embeds: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Prompts -> (sparse (B, N, C), dense (B, C, h, w)).

        points: ((B, N, 2) xy pixels at image_size, (B, N) labels 1 fg / 0 bg / -1 padding);
        boxes: (B, 4) XYXY pixels; masks: (B, 1, 4h, 4w) logits; text_embeds: (B, T, C) `<SEG>` embeddings.
        Sparse is [points, boxes, text_embeds] concatenated on N; dense is `no_mask_embed` broadcast without masks.
        """
        given = (points[0] if points is not None else None, boxes, masks, text_embeds)
        bs = next((t.shape[0] for t in given if t is not None), 1)
        weight = self.no_mask_embed.weight
        parts = [torch.empty(bs, 0, self.embed_dim, device=weight.device, dtype=weight.dtype)]
        if points is not None:
            parts.append(self._embed_points(*points, pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if text_embeds is not None:
            parts.append(text_embeds)
        sparse = torch.cat([p.to(weight.dtype) for p in parts], dim=1)
        if masks is not None:
            return sparse, self.mask_downscaling(masks)
        dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense

    def _embed_points(self, coords: Tensor, labels: Tensor, *, pad: bool) -> Tensor:
        coords = coords + 0.5  # pixel centres
        if pad:  # SAM appends one "not a point" when no box follows
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        pe = self.pe_layer.forward_with_coords(coords, self.input_image_size)  # (B, N, C)
        labels = labels[..., None]
        pe = torch.where(labels == -1, 0.0, pe)
        pe = pe + (labels == -1) * self.not_a_point_embed.weight
        pe = pe + (labels == 0) * self.point_embeddings[0].weight
        return pe + (labels == 1) * self.point_embeddings[1].weight

    def _embed_boxes(self, boxes: Tensor) -> Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)  # (B, 2, C)
        return pe + torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])


# ----------------------------------------------------------------------------- mask decoder


class DecoderAttention(nn.Module):
    """Multi-head attention whose q/k/v projections shrink the width by `downsample_rate`."""

    def __init__(self, *, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        inner = dim // downsample_rate
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C).

        Inputs are cast to the weight dtype: the dense PE is fp32 even when the model runs in bf16.
        """
        dtype = self.q_proj.weight.dtype
        q, k, v = (
            self._heads(p(t.to(dtype))) for p, t in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v))
        )
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (B, nH, Nq, Nk)
        out = (attn @ v).transpose(1, 2)  # (B, Nq, nH, d)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention."""

    def __init__(self, *, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_pe: bool):
        super().__init__()
        self.skip_first_pe = skip_first_pe
        self.self_attn = DecoderAttention(dim=dim, num_heads=num_heads)
        self.norm1 = nn.LayerNorm(dim, eps=DECODER_LN_EPS)
        self.cross_attn_token_to_image = DecoderAttention(
            dim=dim, num_heads=num_heads, downsample_rate=downsample_rate
        )
        self.norm2 = nn.LayerNorm(dim, eps=DECODER_LN_EPS)
        self.mlp = MLPBlock(dim=dim, hidden_dim=mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim, eps=DECODER_LN_EPS)
        self.norm4 = nn.LayerNorm(dim, eps=DECODER_LN_EPS)
        self.cross_attn_image_to_token = DecoderAttention(
            dim=dim, num_heads=num_heads, downsample_rate=downsample_rate
        )

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        """queries (B, N, C), keys (B, HW, C) and their PEs -> updated (queries, keys)."""
        if self.skip_first_pe:  # the first layer replaces the queries (they already hold the PE)
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer between prompt tokens and the image embedding."""

    def __init__(self, *, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                dim=dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                downsample_rate=downsample_rate,
                skip_first_pe=i == 0,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = DecoderAttention(
            dim=dim, num_heads=num_heads, downsample_rate=downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(dim, eps=DECODER_LN_EPS)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """image, image_pe (B, C, h, w); tokens (B, N, C) -> (tokens (B, N, C), image (B, hw, C))."""
        keys = image.flatten(2).transpose(1, 2)  # (B, hw, C)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MaskDecoder(nn.Module):
    """Image embedding + prompts -> mask logits at 4x the embedding grid and predicted IoUs."""

    def __init__(self, *, config: SamMed2DConfig) -> None:
        super().__init__()
        dim = config.prompt_embed_dim
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(
            depth=config.decoder_depth,
            dim=dim,
            num_heads=config.decoder_num_heads,
            mlp_dim=config.decoder_mlp_dim,
            downsample_rate=config.attention_downsample_rate,
        )
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(num_channels=dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(input_dim=dim, hidden_dim=dim, output_dim=dim // 8, num_layers=3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            input_dim=dim,
            hidden_dim=config.iou_head_hidden_dim,
            output_dim=self.num_mask_tokens,
            num_layers=config.iou_head_depth,
        )

    def forward(
        self,
        *,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse: Tensor,
        dense: Tensor,
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor]:
        """image_embeddings (B, C, h, w), image_pe (1, C, h, w), sparse (B, N, C), dense (B, C, h, w)
        -> (mask logits (B, M, 4h, 4w), iou (B, M)); M = 3 (tokens 1..3) if multimask_output else 1 (token 0).
        """
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse, dense)
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou[:, keep]

    def predict_masks(
        self, image: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor
    ) -> tuple[Tensor, Tensor]:
        """All mask tokens: -> (logits (B, 4, 4h, 4w), iou (B, 4))."""
        b, c, h, w = image.shape
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1 + M, C)
        tokens = torch.cat([out_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)  # (B, 1 + M + N, C)
        hs, src = self.transformer(image + dense, image_pe.expand(b, -1, -1, -1), tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        mask_tokens = hs[:, 1 : 1 + self.num_mask_tokens]  # (B, M, C)
        hyper = torch.stack(
            [mlp(mask_tokens[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1
        )
        masks = (hyper @ upscaled.flatten(2)).view(b, -1, *upscaled.shape[2:])
        return masks, self.iou_prediction_head(hs[:, 0])


# ----------------------------------------------------------------------------- top module


class SamMed2D(nn.Module):
    """SAM-Med2D as MedPLIB drives it. Pixel normalisation is done by the caller (no pixel_mean/std here)."""

    def __init__(self, *, config: SamMed2DConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoderViT(config=config)
        self.prompt_encoder = PromptEncoder(config=config)
        self.mask_decoder = MaskDecoder(config=config)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) normalised, zero-padded pixels -> (B, C, S/16, S/16) image embeddings."""
        s = self.config.image_size
        if pixels.dim() != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"SAM-Med2D expects pixels of shape (B, 3, {s}, {s}), got {tuple(pixels.shape)}")
        return self.image_encoder(pixels)

    def decode_with_text(self, image_embeddings: Tensor, text_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, h, w) image embeddings + (B, 1, C) `<SEG>` embeddings -> (low-res logits (B, 1, 4h, 4w), iou (B, 1)).

        As MedPLIB's `evaluate`: text-only prompt, `multimask_output=False` (mask token 0), dense PE in fp32.
        """
        if text_embeds.dim() != 3 or text_embeds.shape[0] != image_embeddings.shape[0]:
            raise ValueError(
                f"text_embeds must be (B, T, C) with B = {image_embeddings.shape[0]}, got {tuple(text_embeds.shape)}"
            )
        sparse, dense = self.prompt_encoder(text_embeds=text_embeds)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse=sparse,
            dense=dense,
            multimask_output=False,
        )


def build_sam_med2d(config: SamMed2DConfig) -> SamMed2D:
    """Build an (uninitialised-weight) SAM-Med2D; load a checkpoint into it with `load_state_dict(strict=True)`."""
    return SamMed2D(config=config)
