"""Pre/post-processing against the reference's stored tensors (golden), and region prompt geometry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.processing import (
    MASK_THRESHOLD,
    binarize,
    box_mask,
    clip_preprocess,
    point_mask,
    pool_region,
    postprocess_masks,
    region_from_stroke,
    region_grid,
    resize_longest_side,
    sam_preprocess,
    sketch_mask,
)

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
needs_golden = pytest.mark.skipif(not (GOLDEN / "a_grounding.npz").is_file(), reason="golden fixtures absent")


def _rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(GOLDEN / "inputs" / name).convert("RGB"))


@needs_golden
@pytest.mark.parametrize(
    ("run", "image"), [("a_grounding", "a_grounding_300x200.png"), ("c_vqa", "c_vqa_320x320.png")]
)
def test_clip_pixels_bitwise(run: str, image: str) -> None:
    pixels = clip_preprocess(_rgb(image))
    assert pixels.dtype == np.float32 and pixels.shape == (3, 336, 336)
    assert np.array_equal(pixels, np.load(GOLDEN / f"{run}.npz")["images_clip"][0])


@needs_golden
def test_sam_pixels_bitwise() -> None:
    pixels, resized_hw = sam_preprocess(_rgb("a_grounding_300x200.png"))
    assert (
        resized_hw
        == tuple(json.loads((GOLDEN / "a_grounding.json").read_text())["resize_list"][0])
        == (171, 256)
    )
    assert np.array_equal(pixels, np.load(GOLDEN / "a_grounding.npz")["images_sam"][0])
    assert not pixels[:, :42].any() and not pixels[:, 213:].any()  # centred zero padding, rows 42..212


@needs_golden
def test_postprocess_and_binary_mask_match_reference() -> None:
    arrays = np.load(GOLDEN / "a_grounding.npz")
    logits = postprocess_masks(torch.from_numpy(arrays["eval_low_res_masks"]), (171, 256), (200, 300))
    assert logits.shape == (1, 1, 200, 300)
    assert torch.equal(logits[:, 0], torch.from_numpy(arrays["eval_pred_mask_logits"]))
    mask = binarize(logits[0, 0]).numpy()
    differ = mask != arrays["eval_pred_mask_binary"][0].astype(bool)
    near = np.abs(logits[0, 0].numpy() - math.log(MASK_THRESHOLD / (1 - MASK_THRESHOLD))) < 1e-4
    assert not (differ & ~near).any()
    gt = arrays["gt_mask"].astype(bool)
    iou = (mask & gt).sum() / (mask | gt).sum()
    assert iou == pytest.approx(json.loads((GOLDEN / "a_grounding.json").read_text())["eval_iou"], abs=1e-6)


def test_postprocess_medplib_quirk_slices_a_band() -> None:
    """Pins medplib.md §5.4: for a 300×200 (W×H) image the released slice keeps rows 10..63 of the
    64×64 map, so the bottom padding (rows 54..63) leaks into the mask; "crop" keeps rows 10.5..53."""
    low = torch.zeros(1, 1, 64, 64)
    low[..., 56:, :] = 100.0  # bottom padding rows
    medplib = postprocess_masks(low, (171, 256), (200, 300), mode="medplib")
    assert medplib[..., -1, :].min() == 100.0 and medplib[..., :150, :].max() == 0.0
    assert postprocess_masks(low, (171, 256), (200, 300), mode="crop").max() == 0.0
    low[..., :10, :] = 100.0  # top padding rows: dropped by both
    assert torch.equal(postprocess_masks(low, (171, 256), (200, 300)), medplib)


def test_crop_equals_medplib_on_square_images() -> None:
    low = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    a = postprocess_masks(low, (256, 256), (320, 320), mode="medplib")
    b = postprocess_masks(low, (256, 256), (320, 320), mode="crop")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="medplib"):
        postprocess_masks(low, (256, 256), (320, 320), mode="lisa")  # type: ignore[arg-type]


def test_crop_mode_keeps_object_position_on_wide_image() -> None:
    """A blob at the centre of the padded 256 frame stays at the centre of a 2:1 image."""
    low = torch.full((1, 1, 64, 64), -10.0)
    low[..., 28:36, 28:36] = 10.0
    mask = binarize(postprocess_masks(low, (128, 256), (100, 200), mode="crop"))[0, 0]
    rows, cols = torch.nonzero(mask, as_tuple=True)
    assert abs(rows.float().mean().item() - 49.5) < 1 and abs(cols.float().mean().item() - 99.5) < 1


def test_binarize_threshold_and_types() -> None:
    t = torch.tensor([-2.3, -2.1, 0.0])  # logit(0.1) = -2.197
    assert binarize(t).tolist() == [False, True, True]
    assert binarize(t.numpy()).dtype == np.bool_


def test_resize_longest_side_rounds_half_up() -> None:
    assert resize_longest_side(np.zeros((200, 300, 3), np.uint8), 336).shape == (224, 336, 3)
    assert resize_longest_side(np.zeros((200, 300, 3), np.uint8), 256).shape == (171, 256, 3)


def test_point_mask_square_and_clipping() -> None:
    m = point_mask(50, 30, (100, 200))
    rows, cols = np.nonzero(m)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 50, 30, 70)
    assert m.sum() == 41 * 41
    assert point_mask(0, 0, (100, 200)).sum() == 21 * 21
    with pytest.raises(ValueError, match="outside"):
        point_mask(200, 10, (100, 200))


def test_box_mask_orientation() -> None:
    """x is the column: the reference demo swapped rows and columns; we do not."""
    m = box_mask(10, 50, 20, 60, (100, 200))
    rows, cols = np.nonzero(m)
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (10, 20, 50, 60)
    assert np.array_equal(box_mask(20, 60, 10, 50, (100, 200)), m)  # dragged the other way
    assert box_mask(190, 90, 400, 300, (100, 200)).sum() == 10 * 10  # clipped
    with pytest.raises(ValueError, match="no area"):
        box_mask(10, 50, 10, 60, (100, 200))
    with pytest.raises(ValueError, match="outside"):
        box_mask(300, 10, 310, 20, (100, 200))


def test_sketch_and_stroke_modes() -> None:
    stroke = np.zeros((100, 200), np.uint8)
    stroke[np.arange(30, 60), np.arange(20, 80, 2)] = 255  # a diagonal line
    assert np.array_equal(sketch_mask(stroke), stroke > 0)
    assert np.array_equal(region_from_stroke(stroke, "box"), box_mask(20, 30, 78, 59, (100, 200)))
    point = region_from_stroke(stroke, "point")  # the median pixel (row 44.5, col 49) rounds to (44, 49)
    rows, cols = np.nonzero(point)
    assert point.sum() == 41 * 41 and (rows.min() + 20, cols.min() + 20) == (44, 49)
    with pytest.raises(ValueError, match="empty"):
        sketch_mask(np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match="box"):
        region_from_stroke(stroke, "lasso")  # type: ignore[arg-type]


def test_region_grid_of_full_mask_covers_unpadded_cells() -> None:
    grid = region_grid(np.ones((200, 300), bool))  # 336×224 after resize, 56 pad rows each side
    assert grid.shape == (24, 24) and grid.dtype == np.bool_
    assert grid[4:20].all() and not grid[:4].any() and not grid[20:].any()


def test_region_grid_box_lands_on_its_patches() -> None:
    grid = region_grid(box_mask(0, 0, 149, 199, (200, 300)))  # left half of the image
    assert grid[4:20, :12].all() and not grid[:, 12:].any()


def test_pool_region_samples_with_reference_quirk() -> None:
    """Cell (r, c) is sampled at (r*23/24, c*23/24) (align_corners=True on k/24), then averaged."""
    rows, cols = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    features = torch.stack([cols, 100 * rows], dim=-1).reshape(576, 2)  # linear, so bilinear is exact
    grid = np.zeros((24, 24), bool)
    grid[12, 6] = grid[0, 0] = True
    pooled = pool_region(features, grid)
    expected = torch.tensor([(6 * 23 / 24) / 2, (100 * 12 * 23 / 24) / 2])
    assert torch.allclose(pooled, expected, atol=1e-4)
    with pytest.raises(ValueError, match="no image patch"):
        pool_region(features, np.zeros((24, 24), bool))


def test_pool_region_subsampling_is_seeded() -> None:
    features = torch.randn(576, 8, generator=torch.Generator().manual_seed(1))
    grid = np.ones((24, 24), bool)
    torch.manual_seed(7)
    a = pool_region(features, grid, max_points=100)
    torch.manual_seed(7)
    b = pool_region(features, grid, max_points=100)
    c = pool_region(features, grid, max_points=100, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.allclose(a, pool_region(features, grid))  # all 576 cells vs a 100-cell subset
