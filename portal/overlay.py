"""Drawing for the portal: mask overlays (fill / outline), region markers, the model-input view.

All functions take and return (H, W, 3) uint8 RGB numpy images and never modify their input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from engine import processing
from portal import texts
from portal.regions import Mark

RGB = tuple[int, int, int]


def outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """(H, W) bool boundary of a (H, W) bool mask: mask pixels with a 4-neighbour outside, grown inward."""
    inner = mask.copy()
    for _ in range(max(1, thickness)):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def overlay_mask(
    rgb: np.ndarray,
    mask: np.ndarray,
    *,
    color: RGB = texts.MASK_COLORS["orange"],
    opacity: float = 0.5,
    style: str = "fill + outline",
) -> np.ndarray:
    """Blend a (H, W) bool mask onto (H, W, 3) uint8 RGB.

    style: "fill" (alpha blend), "outline" (opaque contour only) or "fill + outline".
    """
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
    if style not in texts.MASK_STYLES:
        raise ValueError(f"style must be one of {texts.MASK_STYLES}, got {style!r}")
    out = rgb.astype(np.float32)
    paint = np.asarray(color, np.float32)
    if "fill" in style:
        alpha = float(np.clip(opacity, 0.0, 1.0))
        out[mask] = (1.0 - alpha) * out[mask] + alpha * paint
    if "outline" in style:
        out[outline(mask, _line_width(mask.shape))] = paint
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _line_width(shape: Sequence[int]) -> int:
    return max(1, round(max(shape[:2]) / 256))


def draw_marks(
    rgb: np.ndarray,
    marks: Sequence[Mark],
    pending: tuple[int, int] | None = None,
    color: RGB = texts.MARK_COLOR,
) -> np.ndarray:
    """Draw point / box marks on a copy of (H, W, 3) uint8 RGB; the last mark (the active region) is bold.

    pending: the first corner of an unfinished box, drawn as a cross.
    """
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    width = _line_width(rgb.shape)
    radius = 2 * width + 2
    for i, mark in enumerate(marks):
        active = i == len(marks) - 1
        fill = color if active else (160, 160, 160)
        x0, y0, x1, y1 = mark.xyxy
        if mark.kind == "box":
            draw.rectangle((x0, y0, x1, y1), outline=fill, width=width + (1 if active else 0))
        else:
            draw.ellipse(
                (x0 - radius, y0 - radius, x0 + radius, y0 + radius), fill=fill, outline=(255, 255, 255)
            )
    if pending is not None:
        x, y = pending
        draw.line((x - radius, y, x + radius, y), fill=color, width=width)
        draw.line((x, y - radius, x, y + radius), fill=color, width=width)
    return np.asarray(image)


def model_input_view(rgb: np.ndarray) -> np.ndarray:
    """The square image the CLIP branch receives, before normalisation: (336, 336, 3) uint8.

    The longest side is resized to 336 (engine.processing.resize_longest_side) and the rest is centre-padded
    with CLIP's mean colour, exactly as engine.processing.clip_preprocess does before normalising.
    """
    resized = processing.resize_longest_side(rgb, processing.CLIP_IMAGE_SIZE)
    size = processing.CLIP_IMAGE_SIZE
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = np.asarray(processing.CLIP_PAD_COLOR, np.uint8)
    top, left = (size - resized.shape[0]) // 2, (size - resized.shape[1]) // 2
    canvas[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return canvas
