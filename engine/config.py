"""Typed, self-checking configuration of a MedPLIB model, read from the released checkpoint folder.

The released `config.json` describes the LLaMA decoder, the MoE and the multimodal glue, but not the sizes of
CLIP or SAM-Med2D. CLIP's come from the folder `mm_vision_tower` names when it exists inside or beside the
checkpoint folder, else from CLIP ViT-L/14-336's known configuration (below). SAM's are SAM-Med2D ViT-B at
256 px unless the checkpoint folder holds `tiny_sam_config.json`. Author-local paths are never opened otherwise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.modeling.sam_med2d import SamMed2DConfig
from engine.processing import MASK_THRESHOLD

log = logging.getLogger(__name__)

POSTPROCESS_MODES = ("medplib", "crop")

# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336) vision config: used when no CLIP folder is at hand.
# Only sizes; the weights always come from the MedPLIB checkpoint.
CLIP_L14_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "num_channels": 3,
}
_CLIP_KEYS = tuple(CLIP_L14_336)


@dataclass(frozen=True)
class LlamaSizes:
    """LLaMA decoder sizes (Vicuna-7B-v1.5 for the released model)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")


@dataclass(frozen=True)
class MoESizes:
    """The DeepSpeed MoE settings of `config.json["moe"]` that inference depends on."""

    num_experts: int = 2
    top_k: int = 1
    moe_layers: tuple[int, ...] = ()
    eval_capacity_factor: float = 2.0
    use_residual: bool = False

    def __post_init__(self) -> None:
        if self.top_k != 1:
            raise ValueError(f"only top-1 routing is implemented (MedPLIB uses k=1), got top_k={self.top_k}")
        if self.use_residual:
            raise ValueError("residual MoE is not used by MedPLIB and not implemented")
        if self.num_experts < 1:
            raise ValueError("num_experts must be >= 1")
        # With C = ceil(S / E * factor) >= S no token is ever dropped; our dispatch never drops tokens.
        if self.eval_capacity_factor < self.num_experts:
            log.warning("eval_capacity_factor %s < num_experts: the reference would drop tokens; we do not",
                        self.eval_capacity_factor)


@dataclass(frozen=True)
class MedPLIBConfig:
    """Everything needed to build a MedPLIB model."""

    llm: LlamaSizes
    moe: MoESizes
    clip: dict[str, Any]  # transformers CLIPVisionConfig kwargs
    sam: SamMed2DConfig
    mm_hidden_size: int
    out_dim: int
    projector_type: str = "mlp2x_gelu"
    vision_select_layer: int = -2
    max_sample_point: int = 512
    mm_use_im_start_end: bool = True
    mask_threshold: float = MASK_THRESHOLD
    postprocess: str = "medplib"
    demo_model: bool = False  # config.json "portal_demo_model": true marks our shipped small model

    def __post_init__(self) -> None:
        if self.projector_type != "mlp2x_gelu":
            raise ValueError(f"projector {self.projector_type!r} is not supported (MedPLIB uses mlp2x_gelu)")
        if self.clip["hidden_size"] != self.mm_hidden_size:
            raise ValueError(
                f"CLIP hidden size {self.clip['hidden_size']} != mm_hidden_size {self.mm_hidden_size}: put the CLIP "
                "config folder that `mm_vision_tower` names inside or beside the checkpoint folder")
        if self.out_dim != self.sam.prompt_embed_dim:
            raise ValueError(f"out_dim {self.out_dim} != SAM prompt_embed_dim {self.sam.prompt_embed_dim}")
        if self.postprocess not in POSTPROCESS_MODES:
            raise ValueError(f"postprocess must be one of {POSTPROCESS_MODES}, got {self.postprocess!r}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError("mask_threshold is a probability in (0, 1)")
        if self.clip["image_size"] % self.clip["patch_size"]:
            raise ValueError("CLIP image_size must be a multiple of patch_size")

    @property
    def n_image_tokens(self) -> int:
        return (self.clip["image_size"] // self.clip["patch_size"]) ** 2

    @property
    def region_grid(self) -> int:
        return self.clip["image_size"] // self.clip["patch_size"]

    @classmethod
    def from_folder(cls, folder: str | Path, *, postprocess: str | None = None) -> MedPLIBConfig:
        """Read a checkpoint folder in the released layout."""
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a MedPLIB checkpoint folder holds config.json")
        raw = json.loads(path.read_text())
        return cls.from_released_dict(raw, folder=folder, postprocess=postprocess)

    @classmethod
    def from_released_dict(cls, raw: dict[str, Any], *, folder: Path, postprocess: str | None = None
                           ) -> MedPLIBConfig:
        """postprocess None → `config.json["mask_postprocess"]` (our models may declare "crop"), else the released
        "medplib" behaviour that MedPLIB-7b-2e was trained with."""
        return cls(
            llm=_llama_sizes(raw),
            moe=_moe_sizes(raw),
            clip=_clip_sizes(raw, folder),
            sam=_sam_sizes(folder),
            mm_hidden_size=int(raw["mm_hidden_size"]),
            out_dim=int(raw.get("out_dim", 256)),
            projector_type=raw.get("mm_projector_type", "mlp2x_gelu"),
            vision_select_layer=int(raw.get("mm_vision_select_layer", -2)),
            max_sample_point=int(raw.get("max_sample_point", 512)),
            mm_use_im_start_end=bool(raw.get("mm_use_im_start_end", True)),
            postprocess=postprocess or raw.get("mask_postprocess", "medplib"),
            demo_model=bool(raw.get("portal_demo_model", False)),
        )


def _llama_sizes(raw: dict[str, Any]) -> LlamaSizes:
    n_heads = int(raw["num_attention_heads"])
    rope_theta = raw.get("rope_theta", 10000.0)
    if raw.get("rope_scaling"):
        raise ValueError(f"rope_scaling {raw['rope_scaling']!r} is not supported (MedPLIB uses none)")
    return LlamaSizes(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=n_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        rope_theta=float(rope_theta),
        bos_token_id=int(raw.get("bos_token_id", 1)),
        eos_token_id=int(raw.get("eos_token_id", 2)),
        pad_token_id=int(raw.get("pad_token_id") or 0),
    )


def _moe_sizes(raw: dict[str, Any]) -> MoESizes:
    moe = raw.get("moe")
    n_layers = int(raw["num_hidden_layers"])
    if not moe or not moe.get("moe_enable", False):
        raise ValueError("config.json has no enabled `moe` dict: this is not a MedPLIB MoE checkpoint")
    if moe.get("moe_mode", "dense") != "dense":
        raise ValueError(f"moe_mode {moe['moe_mode']!r} is not supported (MedPLIB-7b-2e uses dense)")
    layers = tuple(int(i) for i in moe.get("moe_layers_idx") or range(n_layers))
    experts = moe.get("num_experts", [2])
    experts = experts if isinstance(experts, list) else [experts]
    if len(set(experts)) != 1:
        raise ValueError(f"layers with different expert counts are not supported: {experts}")
    if layers != tuple(range(n_layers)):
        raise ValueError(f"MoE must be on every layer (dense mode), got moe_layers_idx={list(layers)}")
    return MoESizes(
        num_experts=int(experts[0]),
        top_k=int(moe.get("top_k_experts", 1)),
        moe_layers=layers,
        eval_capacity_factor=float(moe.get("eval_capacity_factor", 2.0)),
        use_residual=bool(moe.get("use_residual", False)),
    )


def _clip_sizes(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    name = raw.get("mm_vision_tower") or raw.get("vision_tower")
    for candidate in _clip_folder_candidates(name, folder):
        cfg_path = candidate / "config.json"
        if cfg_path.is_file():
            clip_raw = json.loads(cfg_path.read_text())
            clip_raw = clip_raw.get("vision_config", clip_raw)
            log.info("CLIP sizes from %s", cfg_path)
            return {k: clip_raw[k] for k in _CLIP_KEYS if k in clip_raw} | {"hidden_act": clip_raw.get("hidden_act", "quick_gelu")}
    return dict(CLIP_L14_336)


def _clip_folder_candidates(name: str | None, folder: Path) -> list[Path]:
    """Folders inside or beside the checkpoint that carry the basename of `mm_vision_tower`."""
    if not name:
        return []
    base = Path(str(name).rstrip("/")).name
    return [folder / base, folder.parent / base]


def _sam_sizes(folder: Path) -> SamMed2DConfig:
    path = folder / "tiny_sam_config.json"
    if path.is_file():
        return SamMed2DConfig.from_dict(json.loads(path.read_text()))
    return SamMed2DConfig()


def released_config_dict(config: MedPLIBConfig, *, vision_tower: str = "clip-vit-large-patch14-336") -> dict[str, Any]:
    """The `config.json` a checkpoint in the released layout carries for `config` (for our own models).

    CLIP and SAM sizes are not part of it: write the CLIP config into a `vision_tower` folder beside the
    weights and SAM's into `tiny_sam_config.json` when they differ from the released sizes.
    """
    llm, moe = config.llm, config.moe
    n = llm.num_layers
    return {
        "architectures": ["MedPLIBForCausalLM"],
        "model_type": "medplib_moe_llama",
        "bos_token_id": llm.bos_token_id, "eos_token_id": llm.eos_token_id, "pad_token_id": llm.pad_token_id,
        "hidden_act": "silu", "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": n, "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
        "max_position_embeddings": llm.max_position_embeddings, "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta, "rope_scaling": None, "tie_word_embeddings": False,
        "vocab_size": llm.vocab_size, "torch_dtype": "float32",
        "mm_hidden_size": config.mm_hidden_size, "mm_projector_type": config.projector_type,
        "mm_use_im_patch_token": False, "mm_use_im_start_end": config.mm_use_im_start_end,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": config.vision_select_layer,
        "mm_vision_tower": vision_tower, "vision_tower": vision_tower, "image_aspect_ratio": "square",
        "tune_mm_mlp_adapter": False, "out_dim": config.out_dim, "max_sample_point": config.max_sample_point,
        "region_fea_adapter": True, "region_geo_sampler": False, "train_mask_decoder": True,
        "portal_demo_model": config.demo_model, "mask_postprocess": config.postprocess,
        "moe": {
            "moe_enable": True, "moe_mode": "dense", "moe_layers_idx": list(range(n)),
            "num_experts": [moe.num_experts] * n, "top_k_experts": moe.top_k, "capacity_factor": 1.5,
            "eval_capacity_factor": moe.eval_capacity_factor, "min_capacity": 0, "use_residual": False,
            "router_aux_loss_coef": 0.0, "ep_size": 1,
        },
    }
