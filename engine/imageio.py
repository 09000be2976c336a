"""Read medical and ordinary images into numpy, safely, and turn them into what the model sees.

Three kinds of file are accepted, recognised by their content (not their name alone):

- photo: PNG / JPEG / TIFF / BMP through Pillow, with a pixel limit checked on the header before decoding;
- dicom: through pydicom (never `force=True`), rescale slope/intercept applied (CT in Hounsfield units),
  MONOCHROME1 inverted, colour (RGB / YBR) converted to RGB, multi-frame files kept as frames;
- nifti: through nibabel, reoriented to RAS+ and sliced in the axial, coronal or sagittal plane.

Layouts of `LoadedImage.volume`:
- photo and dicom: frames first, `(F, H, W)` float32 for greyscale or `(F, H, W, 3)` uint8 for colour;
- nifti: the RAS+ voxel array `(X, Y, Z)` float32; use `get_frame` / `slice_nifti` for 2-D slices.

`to_rgb` gives the `(H, W, 3)` uint8 image the model receives. This module needs numpy, Pillow, pydicom
and nibabel only (no torch, no gradio), so the engine CLI can use it too.
Window presets follow the OHIF viewer's table (width/level in HU).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps
from pydicom.multival import MultiValue

logger = logging.getLogger(__name__)

# Limits: a large CR/mammogram is about 20 Mpx, so 40 Mpx leaves room and stops decompression bombs.
MAX_IMAGE_PIXELS = 40_000_000  # per 2-D image (width x height), checked on the header before decoding
MAX_VOLUME_VOXELS = 128_000_000  # per DICOM series / NIfTI volume (all frames together)
MAX_FILE_BYTES = 200 * 1024 * 1024  # refuse larger files before opening them
PHOTO_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")  # Pillow decoders we allow; all others are refused
AUTO_CONTRAST_PERCENTILES = (0.5, 99.5)

Kind = Literal["photo", "dicom", "nifti"]
Plane = Literal["axial", "coronal", "sagittal"]
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class WindowPreset:
    """A CT display window in Hounsfield units."""

    width: float
    center: float


# OHIF defaults (width / level); tested against the table in tests/test_imageio.py.
WINDOW_PRESETS: dict[str, WindowPreset] = {
    "soft tissue": WindowPreset(width=400, center=40),
    "lung": WindowPreset(width=1500, center=-600),
    "liver": WindowPreset(width=150, center=90),
    "bone": WindowPreset(width=2500, center=480),
    "brain": WindowPreset(width=80, center=40),
}
AUTO = "auto contrast"  # the non-preset choice: percentile stretch
DEFAULT_CT_PRESET = "soft tissue"


class ImageReadError(ValueError):
    """The file is not an image we can read, is corrupt, or is too large. The message says which."""


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare with ==
class LoadedImage:
    """An image read from disk (see the module docstring for the layout of `volume`).

    modality: DICOM Modality ("CT", "MR", "US", ...) or None for photos and NIfTI.
    spacing_mm: (row, col) pixel spacing of a frame / axial slice in mm, or None when unknown.
    voxel_mm: (x, y, z) voxel size in mm for NIfTI (RAS+ order), else None.
    n_frames: number of frames (DICOM, photo) or axial slices (NIfTI).
    window: the window stored in the DICOM header, or None.
    affine: the (4, 4) voxel-to-world affine of the RAS+ volume (NIfTI only), for writing masks back.
    """

    volume: np.ndarray
    kind: Kind
    modality: str | None
    spacing_mm: tuple[float, float] | None
    n_frames: int
    name: str = ""
    voxel_mm: tuple[float, float, float] | None = None
    window: WindowPreset | None = None
    affine: np.ndarray | None = None  # NIfTI only: the (4, 4) RAS+ affine of `volume`

    @property
    def is_color(self) -> bool:
        return self.kind != "nifti" and self.volume.ndim == 4

    @property
    def is_ct(self) -> bool:
        return self.modality == "CT"


# --------------------------------------------------------------------------------------------- reading


def read_image(path: str | Path) -> LoadedImage:
    """Read a PNG/JPEG/TIFF/BMP, DICOM or NIfTI file.

    Raises ImageReadError when the file is missing, of an unsupported type, corrupt, or too large.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"No such file: {path.name}. Choose an existing image file.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ImageReadError(
            f"{path.name} is {size / 2**20:.0f} MiB; the limit is {MAX_FILE_BYTES / 2**20:.0f} MiB. "
            "Export a single slice or a smaller series."
        )
    kind = sniff_kind(path)
    reader = {"photo": _read_photo, "dicom": _read_dicom, "nifti": _read_nifti}[kind]
    image = reader(path)
    logger.info("read %s: kind=%s modality=%s shape=%s", path.name, kind, image.modality, image.volume.shape)
    return image


def sniff_kind(path: Path) -> Kind:
    """Decide the file kind from its first bytes (DICOM 'DICM' at 128, NIfTI header, else photo)."""
    with path.open("rb") as f:
        head = f.read(352)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if name.endswith(".dcm"):
        raise ImageReadError(
            f"{path.name} has no DICOM header ('DICM' marker missing). Export it as a standard DICOM Part 10 file."
        )
    return "photo"


def _read_photo(path: Path) -> LoadedImage:
    """Pillow decode with the pixel limit checked on the header first; (1, H, W, 3) uint8 or (1, H, W) float."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=list(PHOTO_FORMATS)) as im:
                _check_pixels(im.size[0] * im.size[1], path.name)
                im.load()
                pixels = _photo_pixels(ImageOps.exif_transpose(im))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _too_large(path.name) from err
        except Image.UnidentifiedImageError as err:
            raise ImageReadError(
                f"{path.name} is not a supported image. Upload PNG, JPEG, TIFF, BMP, DICOM (.dcm) or NIfTI (.nii/.nii.gz)."
            ) from err
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageReadError(
                f"{path.name} is damaged or truncated and cannot be decoded ({err})."
            ) from err
    return LoadedImage(
        volume=pixels[None], kind="photo", modality=None, spacing_mm=None, n_frames=1, name=path.name
    )


def _photo_pixels(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 for 8-bit images; (H, W) float32 for 16-bit / float greyscale."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(im, dtype=np.float32)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _check_pixels(n_pixels: int, name: str, limit: int = MAX_IMAGE_PIXELS) -> None:
    if n_pixels > limit:
        raise _too_large(name, n_pixels, limit)


def _too_large(name: str, n_pixels: int | None = None, limit: int = MAX_IMAGE_PIXELS) -> ImageReadError:
    got = f" ({n_pixels / 1e6:.0f} Mpx)" if n_pixels else ""
    return ImageReadError(
        f"{name} is too large{got}; the limit is {limit / 1e6:.0f} Mpx. Downsample it before uploading."
    )


def _read_dicom(path: Path) -> LoadedImage:
    """pydicom read (no force), size check before pixel decode, rescale, MONOCHROME1 inversion, colour."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size="1 MB")
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise ImageReadError(f"{path.name} is not a readable DICOM file ({err}).") from err
    if "PixelData" not in ds:
        raise ImageReadError(
            f"{path.name} is a DICOM file without pixel data (e.g. a report or structure set)."
        )
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    _check_pixels(rows * cols, path.name)
    _check_pixels(rows * cols * frames, path.name, MAX_VOLUME_VOXELS)
    volume = _dicom_pixels(ds, path.name)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return LoadedImage(
        volume=volume,
        kind="dicom",
        modality=str(ds.get("Modality")) if ds.get("Modality") else None,
        spacing_mm=(float(spacing[0]), float(spacing[1])) if spacing else None,
        n_frames=volume.shape[0],
        name=path.name,
        window=_dicom_window(ds),
    )


def _dicom_pixels(ds, name: str) -> np.ndarray:
    """(F, H, W) float32 (rescaled, MONOCHROME1 inverted) or (F, H, W, 3) uint8 RGB."""
    from pydicom.pixels import apply_rescale

    try:
        arr = ds.pixel_array  # pydicom converts YBR to RGB by default
    except Exception as err:  # pydicom raises many types for unsupported/corrupt pixel data
        raise ImageReadError(
            f"{name}: the pixel data cannot be decoded ({type(err).__name__}: {err})."
        ) from err
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        arr = arr if frames > 1 else arr[None]
        return _to_uint8_color(arr)
    arr = arr if frames > 1 else arr[None]
    values = apply_rescale(arr, ds).astype(np.float32)
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    return values


def _to_uint8_color(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    arr = arr.astype(np.float32)
    return np.clip(arr / max(float(arr.max()), 1.0) * 255.0, 0, 255).astype(np.uint8)


def _dicom_window(ds) -> WindowPreset | None:
    """First WindowCenter/WindowWidth pair of the header, if any."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    first = lambda value: float(value[0] if isinstance(value, MultiValue) else value)  # noqa: E731
    try:
        return WindowPreset(width=first(width), center=first(center))
    except (TypeError, ValueError, IndexError):
        return None


def _read_nifti(path: Path) -> LoadedImage:
    """nibabel read, shape checked on the header before loading, reoriented to RAS+; (X, Y, Z) float32."""
    import nibabel as nib

    try:
        nii = nib.load(str(path))
    except Exception as err:  # nibabel raises ImageFileError, OSError, EOFError, zlib errors...
        raise ImageReadError(
            f"{path.name} is not a readable NIfTI file ({type(err).__name__}: {err})."
        ) from err
    shape = nii.shape
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] < 1):
        raise ImageReadError(
            f"{path.name} has shape {shape}; a 3-D volume (or the first volume of 4-D) is needed."
        )
    _check_pixels(int(np.prod(shape[:3])), path.name, MAX_VOLUME_VOXELS)
    try:
        canonical = nib.as_closest_canonical(nii.slicer[..., 0] if len(shape) == 4 else nii)
        data = np.asarray(canonical.get_fdata(dtype=np.float32))
    except Exception as err:  # truncated / corrupt data blocks surface here
        raise ImageReadError(
            f"{path.name}: the voxel data is damaged ({type(err).__name__}: {err})."
        ) from err
    zooms = tuple(float(z) for z in canonical.header.get_zooms()[:3])
    return LoadedImage(
        volume=np.nan_to_num(data),
        kind="nifti",
        modality=None,
        spacing_mm=plane_spacing_from(zooms, "axial"),
        n_frames=data.shape[2],
        name=path.name,
        voxel_mm=zooms,  # type: ignore[arg-type]
        affine=np.asarray(canonical.affine, dtype=np.float64),
    )


# -------------------------------------------------------------------------------------------- slicing


def plane_spacing_from(voxel_mm: tuple[float, ...], plane: str) -> tuple[float, float]:
    """(row, col) spacing of a slice in `plane`, for RAS+ voxel sizes (x, y, z)."""
    x, y, z = voxel_mm[:3]
    return {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}[_check_plane(plane)]


def _check_plane(plane: str) -> str:
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    return plane


def n_slices(image: LoadedImage, plane: str = "axial") -> int:
    """Number of frames (DICOM / photo) or slices in `plane` (NIfTI)."""
    if image.kind != "nifti":
        return image.n_frames
    axis = PLANES.index(_check_plane(plane))  # axial -> z (2), coronal -> y (1), sagittal -> x (0)
    return image.volume.shape[2 - axis]


def default_index(image: LoadedImage, plane: str = "axial") -> int:
    """The slice or frame shown and asked about first: the middle one (NIfTI slices, DICOM frames). The CLI and
    the portal both start here, so the same file gets the same answer."""
    return n_slices(image, plane) // 2


def slice_nifti(image: LoadedImage, plane: str, index: int) -> np.ndarray:
    """A 2-D slice of a RAS+ volume in radiological display orientation, (rows, cols) float32.

    axial: rows anterior->posterior, cols patient right->left (Y, X);
    coronal: rows superior->inferior, cols right->left (Z, X);
    sagittal: rows superior->inferior, cols anterior->posterior (Z, Y).
    """
    if image.kind != "nifti":
        raise ValueError(f"slice_nifti needs a NIfTI image, got kind={image.kind!r}")
    index = _check_index(index, n_slices(image, plane))
    vol = image.volume
    if plane == "axial":
        return np.ascontiguousarray(vol[::-1, ::-1, index].T)
    if plane == "coronal":
        return np.ascontiguousarray(vol[::-1, index, ::-1].T)
    return np.ascontiguousarray(vol[index, ::-1, ::-1].T)


def _check_index(index: int, count: int) -> int:
    if not 0 <= int(index) < count:
        raise ValueError(f"slice/frame index {index} is outside 0..{count - 1}")
    return int(index)


def get_frame(image: LoadedImage, index: int = 0, plane: str = "axial") -> np.ndarray:
    """One 2-D frame: (H, W) float32 greyscale or (H, W, 3) uint8 colour."""
    if image.kind == "nifti":
        return slice_nifti(image, plane, index)
    return image.volume[_check_index(index, image.n_frames)]


def frame_spacing(image: LoadedImage, plane: str = "axial") -> tuple[float, float] | None:
    """(row, col) pixel spacing in mm of frames in `plane`, or None when unknown."""
    if image.kind == "nifti" and image.voxel_mm is not None:
        return plane_spacing_from(image.voxel_mm, plane)
    return image.spacing_mm


# ------------------------------------------------------------------------------------------- display


def window(frame: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window (DICOM PS3.3 C.11.2.1.2 simplified): [center - width/2, center + width/2] -> 0..255.

    frame: (H, W) values (e.g. HU). Returns (H, W) uint8.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = center - width / 2.0
    scaled = (frame.astype(np.float32) - low) / float(width) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def auto_contrast(
    frame: np.ndarray, percentiles: tuple[float, float] = AUTO_CONTRAST_PERCENTILES
) -> np.ndarray:
    """Stretch the (0.5, 99.5) percentile range to 0..255 (for MR, US and other non-HU data). (H, W) uint8."""
    low, high = np.percentile(frame, percentiles)
    if high <= low:
        high = low + 1.0
    return window(frame, center=(low + high) / 2.0, width=float(high - low))


def display_window(image: LoadedImage, preset: str | None) -> WindowPreset | None:
    """The window to use, or None for auto contrast.

    preset: a WINDOW_PRESETS name, AUTO ("auto contrast"), or None = the default for the image
    (DEFAULT_CT_PRESET for CT, auto contrast for everything else).
    """
    if preset is None:
        preset = DEFAULT_CT_PRESET if image.is_ct else AUTO
    if preset == AUTO:
        return None
    if preset not in WINDOW_PRESETS:
        raise ValueError(
            f"unknown window preset {preset!r}; choose one of {sorted(WINDOW_PRESETS)} or {AUTO!r}"
        )
    return WINDOW_PRESETS[preset]


def to_rgb(image: LoadedImage, index: int = 0, plane: str = "axial", preset: str | None = None) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image the model receives for one frame / slice.

    Colour frames (and 8-bit photos) pass through. Greyscale frames use the CT window `preset` (soft tissue,
    lung, liver, bone, brain), or AUTO for auto contrast (percentiles 0.5/99.5); None picks the soft-tissue
    window for CT and auto contrast for other modalities.
    """
    frame = get_frame(image, index, plane)
    if frame.ndim == 3:
        return np.ascontiguousarray(frame, dtype=np.uint8)
    chosen = display_window(image, preset)
    grey = window(frame, chosen.center, chosen.width) if chosen else auto_contrast(frame)
    return np.repeat(grey[:, :, None], 3, axis=2)
