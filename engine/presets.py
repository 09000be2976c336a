"""Small model presets and writing a whole checkpoint folder in the released layout.

Used by the tests (a tiny random model) and by the training of our shipped small model, so that both go
through exactly the loader the real MedPLIB-7b-2e goes through.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from engine.config import CLIP_L14_336, LlamaSizes, MedPLIBConfig, MoESizes, released_config_dict
from engine.modeling.medplib import MedPLIBModel
from engine.modeling.sam_med2d import SamMed2DConfig
from engine.tokenizer import save_tokenizer_folder
from engine.weights import save_released

CLIP_FOLDER_NAME = "clip-vision-tower"  # the folder `mm_vision_tower` names inside our checkpoints
RELEASED_VOCAB_SIZE = 32267  # Vicuna's 32000 + MedPLIB's added tokens (reference/medplib.md)


def tiny_config(*, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, clip_hidden: int = 32,
                clip_layers: int = 2, sam_dim: int = 32, demo_model: bool = False) -> MedPLIBConfig:
    """A small MedPLIB of the released architecture (CLIP 336/14, SAM at 256 px, 2 experts)."""
    return MedPLIBConfig(
        llm=LlamaSizes(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                       num_heads=heads, num_kv_heads=heads),
        moe=MoESizes(num_experts=2, top_k=1, moe_layers=tuple(range(layers))),
        clip={"hidden_size": clip_hidden, "intermediate_size": 4 * clip_hidden, "num_hidden_layers": clip_layers,
              "num_attention_heads": 2, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5, "projection_dim": clip_hidden, "num_channels": 3},
        sam=SamMed2DConfig(encoder_embed_dim=sam_dim, encoder_depth=2, encoder_num_heads=2,
                           encoder_global_attn_indexes=(1,), prompt_embed_dim=sam_dim, decoder_mlp_dim=2 * sam_dim,
                           iou_head_hidden_dim=sam_dim),
        mm_hidden_size=clip_hidden,
        out_dim=sam_dim,
        demo_model=demo_model,
    )


def released_config() -> MedPLIBConfig:
    """MedPLIB-7b-2e's exact shapes: Vicuna-7B (4096/11008, 32 layers, 32 heads), 2 experts per layer, CLIP
    ViT-L/14-336, SAM-Med2D ViT-B at 256 px, out_dim 256. For benchmarks with random weights."""
    return MedPLIBConfig(
        llm=LlamaSizes(vocab_size=RELEASED_VOCAB_SIZE, hidden_size=4096, intermediate_size=11008, num_layers=32,
                       num_heads=32, num_kv_heads=32),
        moe=MoESizes(num_experts=2, top_k=1, moe_layers=tuple(range(32))),
        clip=dict(CLIP_L14_336),
        sam=SamMed2DConfig(),
        mm_hidden_size=CLIP_L14_336["hidden_size"],
        out_dim=256,
    )


def random_model_on(config: MedPLIBConfig, *, device: str, dtype: torch.dtype, seed: int = 0) -> MedPLIBModel:
    """Random weights created directly on `device` in `dtype` (router fp32), never copied through host memory."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MedPLIBModel(config)
    finally:
        torch.set_default_dtype(previous)
    for layer in model.llm.layers:
        layer.mlp.router.float()
    return model.eval()


def random_model(config: MedPLIBConfig, *, seed: int = 0) -> MedPLIBModel:
    """A randomly initialised model (real tensors on the CPU, fp32)."""
    torch.manual_seed(seed)
    return MedPLIBModel(config).eval()


def write_checkpoint(model: MedPLIBModel, folder: str | Path, *, sp_model: str | Path,
                     dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, generation_config.json, the CLIP config folder, tiny_sam_config.json (when SAM is not
    the released ViT-B), model.safetensors and the tokenizer files: a folder `load_engine` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    (folder / "config.json").write_text(json.dumps(released_config_dict(config, vision_tower=CLIP_FOLDER_NAME),
                                                   indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.llm.bos_token_id, "eos_token_id": config.llm.eos_token_id,
         "pad_token_id": config.llm.pad_token_id, "max_length": config.llm.max_position_embeddings,
         "use_cache": False}, indent=2) + "\n")
    clip_dir = folder / CLIP_FOLDER_NAME
    clip_dir.mkdir(exist_ok=True)
    (clip_dir / "config.json").write_text(json.dumps(
        {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **config.clip}, indent=2) + "\n")
    if config.sam != SamMed2DConfig():
        sam = dataclasses.asdict(config.sam)
        sam["encoder_global_attn_indexes"] = list(sam["encoder_global_attn_indexes"])
        (folder / "tiny_sam_config.json").write_text(json.dumps(sam, indent=2) + "\n")
    save_released(model, folder, dtype=dtype)
    save_tokenizer_folder(sp_model, folder)
    return folder
