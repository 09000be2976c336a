"""PNG encoding/decoding of case images and masks, with size limits checked before decoding.

Images are stored as (H, W, 3) uint8 RGB PNGs and masks as (H, W) 8-bit PNGs (0 outside, 255 inside).
Everything stored is re-encoded from pixels, so no PNG text chunk or EXIF block survives.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage

from cases.errors import InvalidCaseData

MAX_IMAGE_SIDE = 4096  # pixels; larger teaching images are not useful and cost memory
MAX_IMAGE_PIXELS = 16_777_216  # 4096 x 4096, checked from the header before any decoding
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # one uploaded file (PNG, JPEG, DICOM or NIfTI)
DECODE_FORMATS = ("PNG", "JPEG")


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) gray, (H, W, 1), (H, W, 3) or (H, W, 4) uint8 → (H, W, 3) uint8 RGB (alpha dropped)."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise InvalidCaseData(
            f"images must be uint8, got {array.dtype}; window or rescale them to 0..255 first"
        )
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InvalidCaseData(f"images must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    check_size(array.shape[0], array.shape[1])
    return np.ascontiguousarray(array[:, :, :3])


def check_size(height: int, width: int) -> None:
    """Raise InvalidCaseData for empty images or images over MAX_IMAGE_SIDE / MAX_IMAGE_PIXELS."""
    if height < 1 or width < 1:
        raise InvalidCaseData(f"image is empty ({height}x{width})")
    if max(height, width) > MAX_IMAGE_SIDE or height * width > MAX_IMAGE_PIXELS:
        raise InvalidCaseData(
            f"image is {width}x{height} pixels; the limit is {MAX_IMAGE_SIDE} per side — downsize it first"
        )


def encode_png(array: np.ndarray) -> bytes:
    """Encode (H, W) or (H, W, 3) uint8 pixels as a PNG without any metadata chunk."""
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def encode_rgb_png(image: np.ndarray) -> bytes:
    """(H, W[, C]) uint8 → RGB PNG bytes (see `to_rgb` for accepted layouts)."""
    return encode_png(to_rgb(image))


def encode_mask_png(mask: np.ndarray) -> bytes:
    """(H, W) mask (bool, or non-zero = inside) → 8-bit PNG bytes with 0 / 255."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise InvalidCaseData(f"masks must be (H, W), got shape {array.shape}")
    check_size(*array.shape)
    return encode_png(np.where(array.astype(bool), 255, 0).astype(np.uint8))


def open_checked(data: bytes, formats: tuple[str, ...] = DECODE_FORMATS) -> PILImage.Image:
    """Open image bytes lazily and check byte size, format and pixel count before decoding."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise InvalidCaseData(
            f"file is {len(data) / 2**20:.1f} MiB; the limit is {MAX_UPLOAD_BYTES // 2**20} MiB"
        )
    try:
        image = PILImage.open(io.BytesIO(data), formats=list(formats))
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as error:
        raise InvalidCaseData(f"not a readable {'/'.join(formats)} image: {error}") from error
    check_size(image.height, image.width)
    return image


def decode_rgb(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes → (H, W, 3) uint8 RGB. Metadata is not carried into the array."""
    image = open_checked(data)
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as error:
        raise InvalidCaseData(f"image data is damaged: {error}") from error


def decode_mask(data: bytes) -> np.ndarray:
    """Mask PNG bytes → (H, W) bool; any non-zero gray level (or alpha, for RGBA) is inside."""
    image = open_checked(data, formats=("PNG",))
    if image.mode in ("RGBA", "LA"):
        return np.asarray(image.getchannel("A")) > 0
    return np.asarray(image.convert("L")) > 0
