"""The MedPLIB model assembled from its parts: CLIP tower, projector, region adapter, MoE-LLaMA, lm_head,
`text_hidden_fcs` and SAM-Med2D. Each method is one named step of the forward; `engine.inference` drives them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from engine.config import MedPLIBConfig
from engine.modeling.language import MoELlamaDecoder
from engine.modeling.sam_med2d import SamMed2D, build_sam_med2d
from engine.tokenizer import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX


class MedPLIBModel(nn.Module):
    def __init__(self, config: MedPLIBConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.llm.hidden_size
        clip_cfg = CLIPVisionConfig(**config.clip)
        clip_cfg._attn_implementation = "sdpa"
        self.vision_tower = CLIPVisionModel(clip_cfg)
        self.mm_projector = nn.Sequential(
            nn.Linear(config.mm_hidden_size, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.region_fea_adapter = nn.Linear(config.mm_hidden_size, hidden)
        self.llm = MoELlamaDecoder(llm=config.llm, moe=config.moe)
        self.lm_head = nn.Linear(hidden, config.llm.vocab_size, bias=False)
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, config.out_dim), nn.Dropout(0.0)
        )
        self.sam: SamMed2D = build_sam_med2d(config.sam)

    # ---- image side -------------------------------------------------------------------------------
    def clip_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 336, 336) normalised pixels -> (B, 576, mm_hidden) patch features of layer `select_layer`."""
        out = self.vision_tower(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[self.config.vision_select_layer][:, 1:]  # drop CLS

    def project_image(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, 576, mm_hidden) -> (B, 576, hidden): the image tokens."""
        return self.mm_projector(feats)

    def region_feature_map(self, feats: torch.Tensor) -> torch.Tensor:
        """(576, mm_hidden) -> (576, hidden): what region prompts are pooled from."""
        return self.region_fea_adapter(feats)

    # ---- text side ----------------------------------------------------------------------------------
    def embed_prompt(
        self, ids: list[int], image_tokens: torch.Tensor, region: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids with one -200 (image) and at most one -300 (region) placeholder -> (1, T', hidden).

        The -200 slot becomes the 576 image tokens (T' = T + 575); the -300 slot becomes the region vector.
        """
        n_image = ids.count(IMAGE_TOKEN_INDEX)
        if n_image != 1:
            raise ValueError(f"the prompt must hold exactly one image placeholder, found {n_image}")
        n_region = ids.count(REGION_TOKEN_INDEX)
        if n_region > 1:
            raise ValueError("MedPLIB takes one region per question; the prompt holds several")
        if n_region and region is None:
            raise ValueError("the prompt has <region></region> but no region mask was given")
        pieces: list[torch.Tensor] = []
        run: list[int] = []
        weight = self.llm.embed_tokens.weight
        for tok in ids + [None]:
            if tok is not None and tok >= 0:
                run.append(tok)
                continue
            if run:
                pieces.append(self.llm.embed_tokens(torch.tensor(run, device=weight.device)))
                run = []
            if tok == IMAGE_TOKEN_INDEX:
                pieces.append(image_tokens.to(weight.dtype))
            elif tok == REGION_TOKEN_INDEX:
                pieces.append(region.to(weight.dtype).reshape(1, -1))
        return torch.cat(pieces)[None]

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> (B, T, hidden)."""
        return self.llm.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # ---- mask side ----------------------------------------------------------------------------------
    def seg_embedding(self, hidden: torch.Tensor) -> torch.Tensor:
        """Post-norm hidden state (hidden,) that predicted `<SEG>` -> (1, 1, out_dim) SAM text prompt."""
        fcs_dtype = self.text_hidden_fcs[0].weight.dtype
        return self.text_hidden_fcs(hidden.to(fcs_dtype)).reshape(1, 1, -1)

    def sam_dtype(self) -> torch.dtype:
        return next(self.sam.parameters()).dtype
