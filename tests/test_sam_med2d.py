"""SAM-Med2D modules: strict checkpoint load, parity with the reference golden tensors, sizes, config checks."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.modeling.sam_med2d import SamMed2D, SamMed2DConfig, build_sam_med2d

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
TINY = GOLDEN / "tiny-medplib-ref"
PREFIX = "model.visual_model."
ATOL = 1e-4  # golden README §7: mask logits and embeddings in fp32


def _need_golden() -> None:
    if not (TINY / "model.safetensors").is_file() or not (GOLDEN / "a_grounding.npz").is_file():
        pytest.skip(f"golden fixtures not found at {GOLDEN}")


@pytest.fixture(scope="module")
def tiny_config() -> SamMed2DConfig:
    _need_golden()
    return SamMed2DConfig.from_dict(json.loads((TINY / "tiny_sam_config.json").read_text()))


@pytest.fixture(scope="module")
def tiny_sam(tiny_config: SamMed2DConfig) -> SamMed2D:
    from safetensors.torch import load_file

    tensors = load_file(TINY / "model.safetensors")
    state = {k.removeprefix(PREFIX): v.float() for k, v in tensors.items() if k.startswith(PREFIX)}
    model = build_sam_med2d(tiny_config).eval()
    model.load_state_dict(state, strict=True)  # raises, naming keys, on any mismatch
    return model


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    _need_golden()
    with np.load(GOLDEN / "a_grounding.npz") as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != golden {tuple(b.shape)}"
    return (a - b).abs().max().item()


def test_golden_checkpoint_loads_strictly_without_pixel_stats(tiny_sam: SamMed2D) -> None:
    keys = set(tiny_sam.state_dict())
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in keys
    assert "image_encoder.blocks.0.Adapter.channel.0.weight" in keys
    assert not any("pixel_mean" in k or "pixel_std" in k for k in keys)


@torch.no_grad()
def test_image_encoder_matches_reference(tiny_sam: SamMed2D, golden: dict[str, torch.Tensor]) -> None:
    emb = tiny_sam.encode_image(golden["images_sam"])
    assert _max_err(emb, golden["eval_sam_image_embeddings"]) < ATOL
    assert _max_err(emb, golden["tf_sam_image_embeddings"]) < ATOL


@torch.no_grad()
def test_text_only_prompt_is_the_seg_embedding(tiny_sam: SamMed2D, golden: dict[str, torch.Tensor]) -> None:
    seg = golden["eval_seg_embedding"]
    sparse, dense = tiny_sam.prompt_encoder(text_embeds=seg)
    assert torch.equal(sparse, seg)
    assert dense.shape == (1, 32, 16, 16)
    assert _max_err(sparse, golden["eval_sparse_embeddings"]) == 0.0
    assert torch.equal(dense, golden["eval_dense_embeddings"].expand(1, 32, 16, 16))


@pytest.mark.parametrize("run", ["eval", "tf"])
@torch.no_grad()
def test_mask_decoder_matches_reference(
    tiny_sam: SamMed2D, golden: dict[str, torch.Tensor], run: str
) -> None:
    seg = golden[f"{run}_seg_embedding"]
    low_res, iou = tiny_sam.decode_with_text(golden[f"{run}_sam_image_embeddings"], seg)
    assert _max_err(low_res, golden[f"{run}_low_res_masks"]) < ATOL
    assert _max_err(iou, golden[f"{run}_iou_predictions"]) < ATOL


@torch.no_grad()
def test_pixels_to_mask_end_to_end(tiny_sam: SamMed2D, golden: dict[str, torch.Tensor]) -> None:
    emb = tiny_sam.encode_image(golden["images_sam"])
    low_res, _ = tiny_sam.decode_with_text(emb, golden["eval_seg_embedding"])
    assert _max_err(low_res, golden["eval_low_res_masks"]) < ATOL


def test_points_boxes_and_text_are_concatenated_in_order(tiny_sam: SamMed2D) -> None:
    points = (torch.tensor([[[10.0, 20.0], [100.0, 50.0]]]), torch.tensor([[1, 0]]))
    text = torch.randn(1, 1, 32)
    sparse, _ = tiny_sam.prompt_encoder(points=points, text_embeds=text)
    assert sparse.shape == (1, 4, 32)  # 2 points + 1 padding point + text
    assert torch.equal(sparse[:, -1:], text)
    boxed, _ = tiny_sam.prompt_encoder(points=points, boxes=torch.tensor([[5.0, 5.0, 90.0, 90.0]]))
    assert boxed.shape == (1, 4, 32)  # no padding point when a box follows


def test_vit_b_default_has_the_released_size() -> None:
    with torch.device("meta"):
        model = build_sam_med2d(SamMed2DConfig())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == pytest.approx(271e6, rel=0.01)
    assert count(model.image_encoder) == pytest.approx(267e6, rel=0.01)
    assert count(model.mask_decoder) == pytest.approx(4.1e6, rel=0.02)
    attn = model.image_encoder.blocks[0].attn
    assert attn.rel_pos_h.shape == (27, 64)  # windowed block: 2 * 14 - 1
    assert model.image_encoder.blocks[2].attn.rel_pos_h.shape == (31, 64)  # global block: 2 * 16 - 1


def test_config_rejects_unknown_and_missing_keys() -> None:
    good = {f.name: getattr(SamMed2DConfig(), f.name) for f in dataclasses.fields(SamMed2DConfig)}
    with pytest.raises(ValueError, match="encoder_adaptor"):
        SamMed2DConfig.from_dict(dict(good, encoder_adaptor=True))
    del good["window_size"]
    with pytest.raises(ValueError, match="window_size"):
        SamMed2DConfig.from_dict(good)


def test_config_checks_its_sizes() -> None:
    with pytest.raises(ValueError, match="vit_patch_size"):
        SamMed2DConfig(image_size=250)
    with pytest.raises(ValueError, match="encoder_global_attn_indexes"):
        SamMed2DConfig(encoder_depth=4)


@torch.no_grad()
def test_bf16_model_matches_reference_bf16_run(tiny_sam: SamMed2D) -> None:
    """Pins the bf16 path: the fp32 dense PE meets bf16 weights (the reference casts q/k/v inputs)."""
    with np.load(GOLDEN / "a_grounding_bf16.npz") as data:
        ref = {k: torch.from_numpy(data[k]).to(torch.bfloat16) for k in data.files}
    model = copy.deepcopy(tiny_sam).to(torch.bfloat16)
    emb = model.encode_image(ref["images_sam"])
    low_res, _ = model.decode_with_text(ref["eval_sam_image_embeddings"], ref["eval_seg_embedding"])
    assert low_res.dtype == torch.bfloat16
    assert _max_err(emb.float(), ref["eval_sam_image_embeddings"].float()) < 0.05  # measured: 0 (bitwise)
    assert _max_err(low_res.float(), ref["eval_low_res_masks"].float()) < 0.05  # measured: 0 (bitwise)
