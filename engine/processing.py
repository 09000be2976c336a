"""Image pre-processing, region prompts and mask post-processing, bitwise as in MedPLIB's reference.

Recipes: reference/medplib.md §3, §4.1, §4.2, §5.4 and golden/README.md §8. Resizing is SAM's
`ResizeLongestSide` (PIL bilinear); CLIP pixels are padded with the mean colour before normalising, SAM
pixels are normalised before zero padding; both pads are centred (top = pad // 2). numpy + PIL + torch
only (no cv2, no torchvision); the cv2 nearest-neighbour step is re-implemented as plain indexing.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_IMAGE_SIZE = 336
CLIP_PATCH_SIZE = 14
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_PAD_COLOR = (122, 116, 104)  # int(mean * 255): LLaVA's "pad" aspect-ratio colour
SAM_IMAGE_SIZE = 256
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
SAM_LOW_RES_SIZE = 64  # mask decoder output, (B, 1, 64, 64)
MASK_THRESHOLD = 0.1  # sigmoid(logit) > 0.1 (MedPLIB's evaluation and demo)
POINT_HALF_SIZE = 20  # the demo's point prompt: a 41×41 square
MAX_REGION_POINTS = 512  # config.max_sample_point
PostprocessMode = Literal["medplib", "crop"]


# ---------------------------------------------------------------------- resizing and padding
def longest_side_shape(height: int, width: int, target: int) -> tuple[int, int]:
    """Output (h', w') of SAM's ResizeLongestSide: round-half-up of each side times target/max(h, w)."""
    scale = target * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest_side(image: np.ndarray, target: int) -> np.ndarray:
    """Resize (H, W, C) or (H, W) uint8 so the longest side is `target`, PIL bilinear (antialiased)."""
    _check_uint8_image(image, allow_gray=True)
    h, w = longest_side_shape(image.shape[0], image.shape[1], target)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def _centre_pad(image: np.ndarray, size: int, value: np.ndarray | float) -> np.ndarray:
    """Pad (h, w, ...) to (size, size, ...) with `value`, top = pad_h // 2, left = pad_w // 2."""
    h, w = image.shape[:2]
    out = np.empty((size, size, *image.shape[2:]), dtype=image.dtype)
    out[...] = value
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = image
    return out


def _check_uint8_image(image: np.ndarray, *, allow_gray: bool = False) -> None:
    ok_shape = (image.ndim == 3 and image.shape[2] == 3) or (allow_gray and image.ndim == 2)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or not ok_shape:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB array, got {getattr(image, 'dtype', type(image))} "
            f"{getattr(image, 'shape', '')}; convert with np.asarray(pil.convert('RGB'))"
        )
    if min(image.shape[:2]) < 1:
        raise ValueError(f"image has an empty side: {image.shape}")


# ---------------------------------------------------------------------- model inputs
def clip_preprocess(
    rgb: np.ndarray,
    *,
    size: int = CLIP_IMAGE_SIZE,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    pad_color: tuple[int, int, int] = CLIP_PAD_COLOR,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, size, size) float32 CLIP pixels (LLaVA "pad" + CLIPImageProcessor)."""
    _check_uint8_image(rgb)
    padded = _centre_pad(resize_longest_side(rgb, size), size, np.asarray(pad_color, dtype=np.uint8))
    x = (padded.astype(np.float64) * (1 / 255)).astype(np.float32)  # CLIPImageProcessor.rescale
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, size, size)


def sam_preprocess(rgb: np.ndarray, *, size: int = SAM_IMAGE_SIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) uint8 RGB -> ((3, size, size) float32 SAM pixels, resized (h', w')).

    Normalised first, then zero-padded centred (MedPLIB; standard SAM pads bottom-right).
    (h', w') is what `postprocess_masks` needs as `resized_hw`.
    """
    _check_uint8_image(rgb)
    resized = resize_longest_side(rgb, size)
    x = (resized.astype(np.float32) - np.asarray(SAM_MEAN, dtype=np.float32)) / np.asarray(
        SAM_STD, dtype=np.float32
    )
    padded = _centre_pad(x, size, 0.0)
    return np.ascontiguousarray(padded.transpose(2, 0, 1)), (resized.shape[0], resized.shape[1])


# ---------------------------------------------------------------------- region prompts (image resolution)
def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) < 2 or min(shape[:2]) < 1:
        raise ValueError(f"image shape must be (H, W) with positive sides, got {shape}")
    return int(shape[0]), int(shape[1])


def point_mask(x: float, y: float, shape: tuple[int, int], *, half: int = POINT_HALF_SIZE) -> np.ndarray:
    """(H, W) bool square of side 2*half+1 centred on pixel (x = column, y = row), clipped to the image."""
    h, w = _check_shape(shape)
    col, row = int(round(x)), int(round(y))
    if not (0 <= col < w and 0 <= row < h):
        raise ValueError(f"point (x={x}, y={y}) is outside the {w}×{h} (W×H) image; click inside it")
    mask = np.zeros((h, w), dtype=bool)
    mask[max(row - half, 0) : row + half + 1, max(col - half, 0) : col + half + 1] = True
    return mask


def box_mask(x1: float, y1: float, x2: float, y2: float, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool filled rectangle, columns x1..x2 and rows y1..y2 inclusive (XYXY pixels), clipped.

    The reference demo filled `mask[x1:x2+1, y1:y2+1]` (rows and columns swapped); this is the corrected one.
    """
    h, w = _check_shape(shape)
    (c1, c2), (r1, r2) = sorted((int(round(x1)), int(round(x2)))), sorted((int(round(y1)), int(round(y2))))
    if c1 == c2 or r1 == r2:
        raise ValueError(
            f"box ({x1}, {y1}, {x2}, {y2}) has no area; drag a rectangle wider and taller than 1 px"
        )
    c1, c2, r1, r2 = max(c1, 0), min(c2, w - 1), max(r1, 0), min(r2, h - 1)
    if c1 > c2 or r1 > r2:
        raise ValueError(f"box ({x1}, {y1}, {x2}, {y2}) lies outside the {w}×{h} (W×H) image")
    mask = np.zeros((h, w), dtype=bool)
    mask[r1 : r2 + 1, c1 : c2 + 1] = True
    return mask


def sketch_mask(stroke_mask: np.ndarray) -> np.ndarray:
    """(H, W) bool of the drawn stroke pixels themselves (not a filled outline), as the demo uses them."""
    stroke = np.asarray(stroke_mask)
    if stroke.ndim != 2:
        raise ValueError(
            f"a sketch must be an (H, W) mask, got shape {stroke.shape}; take one channel or alpha"
        )
    mask = stroke.astype(bool)
    if not mask.any():
        raise ValueError("the sketch is empty; draw over the region of interest")
    return mask


def region_from_stroke(stroke_mask: np.ndarray, mode: Literal["point", "box", "sketch"]) -> np.ndarray:
    """The demo's rule for a drawn stroke: its median pixel (point), bounding box (box) or itself (sketch)."""
    stroke = sketch_mask(stroke_mask)
    rows, cols = np.nonzero(stroke)
    if mode == "point":
        return point_mask(float(np.median(cols)), float(np.median(rows)), stroke.shape)
    if mode == "box":
        return box_mask(cols.min(), rows.min(), cols.max(), rows.max(), stroke.shape)
    if mode == "sketch":
        return stroke
    raise ValueError(f"unknown region mode {mode!r}; use 'point', 'box' or 'sketch'")


def region_grid(mask: np.ndarray, *, size: int = CLIP_IMAGE_SIZE, patch: int = CLIP_PATCH_SIZE) -> np.ndarray:
    """(H, W) bool region at image size -> (size/patch, size/patch) bool grid over the CLIP patches.

    Same geometry as the CLIP input: longest side to `size` (PIL bilinear on uint8 0/1), centre-pad with
    0, then cv2-style INTER_NEAREST downscale by 1/patch (source index = floor(dst * patch)).
    """
    region = np.asarray(mask)
    if region.ndim != 2:
        raise ValueError(f"region mask must be (H, W), got shape {region.shape}")
    padded = _centre_pad(resize_longest_side(region.astype(np.uint8), size), size, 0)
    return padded[::patch, ::patch][: size // patch, : size // patch].astype(bool)


def pool_region(
    features: torch.Tensor,
    grid: np.ndarray | torch.Tensor,
    *,
    max_points: int = MAX_REGION_POINTS,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Average the (N, C) patch features at the grid's nonzero cells -> (C,) region feature (fp32).

    N = n*n patches in row-major order (576 = 24×24). More than max_points cells: a random subset via
    `torch.randperm` (global RNG when generator is None, as the reference). Sampling reproduces the
    reference quirk: points (row/n, col/n) flipped to (x, y), grid_sample(2p-1, align_corners=True).
    """
    cells = torch.as_tensor(np.asarray(grid, dtype=bool) if not torch.is_tensor(grid) else grid.bool())
    n = cells.shape[0]
    if cells.ndim != 2 or cells.shape[1] != n or features.ndim != 2 or features.shape[0] != n * n:
        raise ValueError(
            f"features {tuple(features.shape)} must be (n*n, C) for a square (n, n) grid, "
            f"got grid {tuple(cells.shape)}"
        )
    points = torch.nonzero(cells)  # (P, 2) row, col
    if points.shape[0] == 0:
        raise ValueError("the region covers no image patch; draw a larger region inside the image")
    if points.shape[0] > max_points:
        points = points[torch.randperm(points.shape[0], generator=generator)[:max_points]]
    xy = (points.float() / n).flip(-1).to(features.device)  # (P, 2) x, y in [0, 1)
    fmap = features.float().t().reshape(1, -1, n, n)  # (1, C, n, n)
    sampled = F.grid_sample(fmap, (2 * xy - 1)[None, None], align_corners=True)  # (1, C, 1, P)
    return torch.nan_to_num(sampled[0, :, 0].mean(dim=-1))  # (C,)


# ---------------------------------------------------------------------- masks out
def postprocess_masks(
    low_res: torch.Tensor,
    resized_hw: tuple[int, int],
    original_hw: tuple[int, int],
    *,
    mode: PostprocessMode = "medplib",
) -> torch.Tensor:
    """(B, 1, 64, 64) mask logits -> (B, 1, H, W) logits at the original image size.

    "medplib": the released function (reference/medplib.md §5.4): slice
    `[pad_top : pad_top + h']` with pad = 64 - h' in 256-scale units (negative for real images, so
    Python slicing keeps an off-centre band), then bilinear to (H, W). Bitwise as the reference; wrong
    for non-square images, but the model was trained with it.
    "crop": the corrected one: bilinear to 256, crop the centred h'×w' window, bilinear to (H, W)
    (for square images the window is the whole frame and the result equals "medplib").
    """
    if low_res.ndim != 4:
        raise ValueError(f"low_res must be (B, 1, 64, 64), got {tuple(low_res.shape)}")
    (h, w), size = resized_hw, low_res.shape[-1]
    if mode == "medplib":
        top, left = (size - h) // 2, (size - w) // 2
        window = low_res[..., top : top + h, left : left + w]
    elif mode == "crop" and (h, w) == (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE):
        window = low_res  # square image: the whole frame, one interpolation (identical to "medplib")
    elif mode == "crop":
        up = F.interpolate(low_res, (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mode="bilinear", align_corners=False)
        top, left = (SAM_IMAGE_SIZE - h) // 2, (SAM_IMAGE_SIZE - w) // 2
        window = up[..., top : top + h, left : left + w]
    else:
        raise ValueError(f"unknown postprocess mode {mode!r}; use 'medplib' or 'crop'")
    return F.interpolate(window, tuple(original_hw), mode="bilinear", align_corners=False)


def binarize(
    logits: torch.Tensor | np.ndarray, threshold: float = MASK_THRESHOLD
) -> torch.Tensor | np.ndarray:
    """Mask logits -> bool mask, `sigmoid(logits) > threshold`; returns the input's kind (tensor or array)."""
    if torch.is_tensor(logits):
        return torch.sigmoid(logits) > threshold
    return (torch.sigmoid(torch.from_numpy(np.asarray(logits))) > threshold).numpy()
