"""Read medical and ordinary images into numpy, safely, and turn them into what the model sees.

Three kinds of file are accepted, recognised by their content (not their name alone):

- photo: PNG / JPEG / TIFF / BMP through Pillow, with a pixel limit checked on the header before decoding;
- dicom: through pydicom (never `force=True`), rescale slope/intercept applied (CT in Hounsfield units),
  MONOCHROME1 inverted, colour (RGB / YBR) converted to RGB, multi-frame files kept as frames;
- nifti: header through nibabel, voxels streamed to disk, reoriented to RAS+ (a view) and sliced in the
  axial, coronal or sagittal plane.

Layouts of `LoadedImage.volume`, always in the narrowest dtype that holds the stored values (an int16 CT stays
int16, a photo is uint8); volumes over SPILL_BYTES are memory-mapped from a private, already unlinked file, so
a session keeps only the pages of the slices it looked at:
- photo and dicom: frames first, `(F, H, W)` stored values for greyscale or `(F, H, W, 3)` uint8 for colour;
- nifti: the RAS+ voxel array `(X, Y, Z)` of stored values.
`get_frame` / `slice_nifti` give one 2-D frame as float32 with `rescale` (slope, intercept) and the
MONOCHROME1 inversion applied: only that slice is ever decoded.

Every bad file raises ImageReadError (never a decoder's own exception); sizes are checked on the header before
decoding (MAX_IMAGE_PIXELS per 2-D slice in every plane, MAX_VOLUME_VOXELS and MAX_DECODED_BYTES per upload),
and no process-wide state (Pillow's limit, warning filters) is touched.

`to_rgb` gives the `(H, W, 3)` uint8 image the model receives. This module needs numpy, Pillow, pydicom
and nibabel only (no torch, no gradio), so the engine CLI can use it too.
Window presets follow the OHIF viewer's table (width/level in HU).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import mmap
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps
from pydicom.multival import MultiValue

logger = logging.getLogger(__name__)

# Limits: a large CR/mammogram is about 20 Mpx, so 40 Mpx leaves room and stops decompression bombs.
MAX_IMAGE_PIXELS = 40_000_000  # per 2-D image (width x height), checked on the header before decoding
MAX_VOLUME_VOXELS = 160_000_000  # per DICOM file / NIfTI volume (all frames together): 512 x 512 x 600
MAX_FILE_BYTES = 200 * 1024 * 1024  # refuse larger files before opening them
MAX_DECODED_BYTES = 192 * 1024 * 1024  # DICOM pixels (or inflated bytes) of one upload: pydicom holds both the
# raw and the decoded pixels at once, so this bounds the peak of a read to about twice it
MAX_SPILLED_BYTES = 1024 * 1024 * 1024  # a NIfTI volume streamed to disk (never whole in memory)
SPILL_BYTES = 16 * 1024 * 1024  # decoded volumes above this live in a private memory-mapped file, not in RAM
CHUNK_BYTES = 4 * 1024 * 1024  # streaming copy / inflate step
GZIP_MAGIC = b"\x1f\x8b"
DEFLATED_UID = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
NIFTI2_SIZEOF_HDR = (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")  # 540, little / big endian
PHOTO_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")  # Pillow decoders we allow; all others are refused
AUTO_CONTRAST_PERCENTILES = (0.5, 99.5)
PERCENTILE_SAMPLE_PIXELS = 4_000_000  # auto contrast of a larger frame reads its percentiles on a subsample
WINDOW_CHUNK_PIXELS = 1 << 20  # windowing works on row blocks of about this many pixels

Kind = Literal["photo", "dicom", "nifti"]
Plane = Literal["axial", "coronal", "sagittal"]
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
KIND_NAMES = {"photo": "image", "dicom": "DICOM", "nifti": "NIfTI"}


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
    rescale: (slope, intercept) from stored values to real ones (HU for CT), applied per frame.
    invert: MONOCHROME1 only: frames are shown as `invert - value` (min + max of the rescaled volume).
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
    rescale: tuple[float, float] = (1.0, 0.0)
    invert: float | None = None

    @property
    def nbytes_in_memory(self) -> int:
        """Bytes the decoded volume holds in RAM (0 for a memory-mapped volume, whose pages the OS may drop)."""
        return 0 if _is_mapped(self.volume) else int(self.volume.nbytes)

    @property
    def is_color(self) -> bool:
        return self.kind != "nifti" and self.volume.ndim == 4

    @property
    def is_ct(self) -> bool:
        return self.modality == "CT"


# --------------------------------------------------------------------------------------------- reading


def read_image(path: str | Path, spill_dir: str | Path | None = None) -> LoadedImage:
    """Read a PNG/JPEG/TIFF/BMP, DICOM or NIfTI file.

    spill_dir: where volumes over SPILL_BYTES are written (a private file, unlinked at once and memory-mapped;
    default: the system temp folder). Raises ImageReadError, and only ImageReadError, for every file that is
    missing, of an unsupported type, damaged, or too large; the message never contains the file's name
    (names may identify a patient, and messages end up in logs). Changes no process-wide state.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError("No such file: the upload is gone. Upload it again.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ImageReadError(
            f"The file is {size / 2**20:.0f} MiB; the limit is {MAX_FILE_BYTES / 2**20:.0f} MiB. "
            "Export a single slice or a smaller series."
        )
    kind = sniff_kind(path)
    spill = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
    try:
        image = _READERS[kind](path, spill)
    except ImageReadError:
        raise
    except MemoryError as err:
        raise ImageReadError("The file needs more memory to decode than one upload may use.") from err
    except Exception as err:  # the reader boundary: decoders raise dozens of types for damaged files
        raise ImageReadError(
            f"The file is damaged or not a readable {KIND_NAMES[kind]} file ({type(err).__name__})."
        ) from err
    logger.info("read an upload: kind=%s modality=%s shape=%s", kind, image.modality, image.volume.shape)
    return image


def sniff_kind(path: Path) -> Kind:
    """Decide the file kind from its first bytes (DICOM 'DICM' at 128, NIfTI header, else photo)."""
    with path.open("rb") as f:
        head = f.read(548)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")) or head[:2] == GZIP_MAGIC:
        return "nifti"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if name.endswith(".dcm"):
        raise ImageReadError(
            "The file has no DICOM header ('DICM' marker missing). Export it as a standard DICOM Part 10 file."
        )
    return "photo"


def _open_unnamed(path: Path) -> BinaryIO:
    """The file opened without its name: decoders that warn or log (pydicom, Pillow) then cannot repeat it."""
    return io.BufferedReader(io.FileIO(os.open(path, os.O_RDONLY), mode="rb", closefd=True))


def _spill(array: np.ndarray, folder: Path) -> np.ndarray:
    """The array itself when small, else a read-only memory map of a private, already unlinked copy on disk."""
    if array.nbytes <= SPILL_BYTES:
        return array
    with tempfile.NamedTemporaryFile(dir=folder, prefix="medplib-volume-", delete=True) as f:
        array.tofile(f)  # NamedTemporaryFile is 0600; the name goes when the block ends, the map stays
        f.flush()
        return np.memmap(f.name, dtype=array.dtype, mode="r", shape=array.shape)


# ---- photos


def _read_photo(path: Path, spill: Path) -> LoadedImage:
    """Pillow decode with the pixel limit checked on the header first.

    (1, H, W, 3) uint8 for 8-bit images; (1, H, W) uint16 / int32 / float32 for 16-bit, 32-bit and float
    greyscale (the narrowest dtype that holds them).
    """
    try:
        im = Image.open(_open_unnamed(path), formats=list(PHOTO_FORMATS))
    except Image.DecompressionBombError as err:  # Pillow's own (higher) limit, checked on the header
        raise _too_large() from err
    except Image.UnidentifiedImageError as err:
        raise ImageReadError(
            "The file is not a supported image. Upload PNG, JPEG, TIFF, BMP, DICOM (.dcm) or NIfTI (.nii/.nii.gz)."
        ) from err
    with im:
        _check_pixels(im.size[0] * im.size[1])
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageReadError("The image is damaged or truncated and cannot be decoded.") from err
        ImageOps.exif_transpose(im, in_place=True)
        pixels = _photo_pixels(im)
    return LoadedImage(volume=_spill(pixels[None], spill), kind="photo", modality=None, spacing_mm=None, n_frames=1)


def _photo_pixels(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 for 8-bit images; (H, W) uint16 / int32 / float32 for deeper greyscale."""
    if im.mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16, copy=False)
    if im.mode in ("I", "F"):
        return np.asarray(im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _check_pixels(n_pixels: int, limit: int = MAX_IMAGE_PIXELS) -> None:
    if n_pixels > limit:
        raise _too_large(n_pixels, limit)


def _too_large(n_pixels: int | None = None, limit: int = MAX_IMAGE_PIXELS) -> ImageReadError:
    got = f" ({n_pixels / 1e6:.0f} Mpx)" if n_pixels else ""
    return ImageReadError(
        f"The image is too large{got}; the limit is {limit / 1e6:.0f} Mpx. Downsample it before uploading."
    )


# ---- DICOM


def _read_dicom(path: Path, spill: Path) -> LoadedImage:
    """pydicom read (no force), sizes checked before any pixel or deflate decoding; pixels kept in their dtype."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_deflated_size(path)
    try:
        with _open_unnamed(path) as f:
            ds = pydicom.dcmread(f)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise ImageReadError("The file is not a readable DICOM file.") from err
    if "PixelData" not in ds:
        raise ImageReadError("The file is a DICOM file without pixel data (e.g. a report or structure set).")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 16) or 16)
    if min(rows, cols, frames, samples, bits) < 1:
        raise ImageReadError(f"The DICOM header declares an empty image ({rows}×{cols}, {frames} frames).")
    _check_pixels(rows * cols)
    _check_pixels(rows * cols * frames, MAX_VOLUME_VOXELS)
    if rows * cols * frames * samples * max(bits // 8, 1) > MAX_DECODED_BYTES:
        raise ImageReadError(
            f"The DICOM pixel data would take over {MAX_DECODED_BYTES / 2**20:.0f} MiB; upload fewer frames."
        )
    return _dicom_image(ds, spill)


def _check_deflated_size(path: Path) -> None:
    """A deflated DICOM is inflated whole by pydicom: inflate it here first, bounded, and discard the output.

    The meta group (explicit VR little endian, its length in (0002,0000)) names the transfer syntax.
    """
    with _open_unnamed(path) as f:
        head = f.read(144)
        if head[132:138] != b"\x02\x00\x00\x00UL":
            return  # no group length: pydicom decides whether the file is readable
        group_length = struct.unpack("<I", head[140:144])[0]
        if DEFLATED_UID not in f.read(min(group_length, 1 << 16)):
            return
        f.seek(144 + group_length)
        _bounded_inflate(f, MAX_DECODED_BYTES)


def _bounded_inflate(f: BinaryIO, limit: int) -> None:
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    while chunk := f.read(CHUNK_BYTES):
        total += len(inflater.decompress(chunk, limit + 1 - total))
        while inflater.unconsumed_tail and total <= limit:
            total += len(inflater.decompress(inflater.unconsumed_tail, limit + 1 - total))
        if total > limit:
            raise ImageReadError(
                f"The deflated DICOM file inflates to over {limit / 2**20:.0f} MiB; upload fewer frames."
            )


def _dicom_image(ds, spill: Path) -> LoadedImage:
    """Decode the pixels: colour as (F, H, W, 3) uint8; greyscale as (F, H, W) in the stored dtype, with the
    rescale (slope / intercept) and MONOCHROME1 inversion kept aside and applied per frame."""
    from pydicom.pixels import apply_rescale

    try:
        arr = ds.pixel_array  # pydicom converts YBR to RGB by default
    except Exception as err:  # pydicom raises many types for unsupported or corrupt pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        raise ImageReadError(
            f"The DICOM pixel data cannot be decoded ({name}: damaged, or a compression this server cannot "
            "decode). Re-export it uncompressed."
        ) from err
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = arr if frames > 1 else arr[None]
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    common = {
        "kind": "dicom",
        "modality": str(ds.get("Modality")) if ds.get("Modality") else None,
        "spacing_mm": (float(spacing[0]), float(spacing[1])) if spacing and len(spacing) >= 2 else None,
        "n_frames": arr.shape[0],
        "window": _dicom_window(ds),
    }
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return LoadedImage(volume=_spill(_to_uint8_color(arr), spill), **common)
    if arr.ndim != 3:
        raise ImageReadError(f"The DICOM pixel data has an unexpected shape {arr.shape}.")
    intercept, one = (float(v) for v in apply_rescale(np.array([0.0, 1.0]), ds))
    rescale = (one - intercept, intercept)
    invert = None
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        low, high = sorted(float(v) * rescale[0] + rescale[1] for v in (arr.min(), arr.max()))
        invert = low + high
    return LoadedImage(volume=_spill(arr, spill), rescale=rescale, invert=invert, **common)


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
        window = WindowPreset(width=first(width), center=first(center))
    except (TypeError, ValueError, IndexError):
        return None
    return window if np.isfinite([window.width, window.center]).all() and window.width > 0 else None


# ---- NIfTI


def _read_nifti(path: Path, spill: Path) -> LoadedImage:
    """Stream a single-file NIfTI-1/2 (.nii or .nii.gz) to a private memory-mapped file, never whole in memory.

    The header is checked first (3-D, or the first volume of 4-D; every plane's slice under the pixel limit;
    the voxel count and bytes under their limits). `volume` is the RAS+ (X, Y, Z) view of the stored voxels in
    their stored dtype; `rescale` holds the scl_slope / scl_inter applied per slice.
    """
    import nibabel as nib

    with _open_unnamed(path) as raw_file, _maybe_gunzip(raw_file) as f:
        header = _nifti_header(f, nib)
        shape, dtype = _nifti_shape(header), header.get_data_dtype()
        _skip(f, int(header["vox_offset"]) - header.sizeof_hdr)
        raw = _stream_to_memmap(f, shape, dtype, spill)
    affine = header.get_best_affine()
    if not np.isfinite(affine).all():
        raise ImageReadError("The NIfTI header has an invalid affine (NaN or infinite values).")
    ornt = nib.orientations.io_orientation(affine)
    volume = nib.orientations.apply_orientation(raw, ornt)  # a view: flips and a transpose
    canonical = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    zooms = tuple(float(z) for z in np.sqrt((canonical[:3, :3] ** 2).sum(axis=0)))
    slope, inter = header.get_slope_inter()
    rescale = (1.0 if slope is None else float(slope), 0.0 if inter is None else float(inter))
    if not np.isfinite(rescale).all():
        rescale = (1.0, 0.0)
    return LoadedImage(
        volume=volume,
        kind="nifti",
        modality=None,
        spacing_mm=plane_spacing_from(zooms, "axial"),
        n_frames=volume.shape[2],
        voxel_mm=zooms,  # type: ignore[arg-type]
        affine=canonical,
        rescale=rescale,
    )


def _maybe_gunzip(f: BinaryIO) -> BinaryIO:
    """A gzip reader over f when f starts with the gzip magic, else f itself (rewound)."""
    gzipped = f.read(2) == GZIP_MAGIC
    f.seek(0)
    return gzip.GzipFile(fileobj=f, mode="rb") if gzipped else contextlib.nullcontext(f)  # type: ignore[return-value]


def _nifti_header(f: BinaryIO, nib) -> Any:
    """The NIfTI-1 or NIfTI-2 header (single file, 'n+1' / 'n+2' magic), checked by nibabel; reads no further."""
    head = f.read(348)
    if len(head) == 348 and head[:4] in NIFTI2_SIZEOF_HDR:
        head += f.read(540 - 348)
        klass = nib.Nifti2Header
    else:
        klass = nib.Nifti1Header
    if len(head) < klass.sizeof_hdr:
        raise ImageReadError("The NIfTI file is truncated: its header is incomplete.")
    header = klass.from_fileobj(io.BytesIO(head), check=True)
    if bytes(header["magic"]).rstrip(b"\0") not in (b"n+1", b"n+2"):
        raise ImageReadError("Only single-file NIfTI (.nii / .nii.gz) is supported, not .hdr/.img pairs.")
    return header


def _nifti_shape(header: Any) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise ImageReadError(
            f"The NIfTI file has shape {shape}; a 3-D volume (or the first volume of 4-D) is needed."
        )
    x, y, z = shape[:3]
    for plane_pixels in (x * y, x * z, y * z):  # the axial, coronal and sagittal slices
        _check_pixels(plane_pixels)
    _check_pixels(x * y * z, MAX_VOLUME_VOXELS)
    if x * y * z * header.get_data_dtype().itemsize > MAX_SPILLED_BYTES:
        raise ImageReadError(
            f"The NIfTI volume would take over {MAX_SPILLED_BYTES / 2**20:.0f} MiB; crop or resample it."
        )
    if header.get_data_dtype().kind not in "iuf" or header.get_data_dtype().fields:
        raise ImageReadError(f"NIfTI voxels of type {header.get_data_dtype()} are not supported (use int or float).")
    return x, y, z


def _skip(f: BinaryIO, n_bytes: int) -> None:
    if n_bytes < 0:
        raise ImageReadError("The NIfTI header's vox_offset points inside the header.")
    if len(f.read(n_bytes)) < n_bytes:
        raise ImageReadError("The NIfTI file is truncated before its voxel data.")


def _stream_to_memmap(f: BinaryIO, shape: tuple[int, int, int], dtype: np.dtype, spill: Path) -> np.ndarray:
    """Copy the first prod(shape) voxels (Fortran order, as NIfTI stores them) to an unlinked private file."""
    n_bytes = int(np.prod(shape)) * dtype.itemsize
    with tempfile.NamedTemporaryFile(dir=spill, prefix="medplib-volume-", delete=True) as out:
        left = n_bytes
        while left:
            chunk = f.read(min(CHUNK_BYTES, left))
            if not chunk:
                raise ImageReadError("The NIfTI file is truncated: its voxel data is incomplete.")
            out.write(chunk)
            left -= len(chunk)
        out.flush()
        return np.memmap(out.name, dtype=dtype, mode="r", shape=shape, order="F")


_READERS = {"photo": _read_photo, "dicom": _read_dicom, "nifti": _read_nifti}


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
        raw = vol[::-1, ::-1, index].T
    elif plane == "coronal":
        raw = vol[::-1, index, ::-1].T
    else:
        raw = vol[index, ::-1, ::-1].T
    return _real_values(image, raw)


def _real_values(image: LoadedImage, raw: np.ndarray) -> np.ndarray:
    """(H, W) stored values -> float32 real values (rescale, MONOCHROME1 inversion, NaN/inf -> 0), a new array."""
    slope, intercept = image.rescale
    values = np.array(raw, dtype=np.float32, order="C")
    if (slope, intercept) != (1.0, 0.0):
        values *= np.float32(slope)
        values += np.float32(intercept)
    if image.invert is not None:
        np.subtract(np.float32(image.invert), values, out=values)
    return np.nan_to_num(values, copy=False, posinf=0.0, neginf=0.0)


def _is_mapped(array: np.ndarray) -> bool:
    base: Any = array
    while base is not None:
        if isinstance(base, np.memmap | mmap.mmap):
            return True
        base = getattr(base, "base", None)
    return False


def _check_index(index: int, count: int) -> int:
    if not 0 <= int(index) < count:
        raise ValueError(f"slice/frame index {index} is outside 0..{count - 1}")
    return int(index)


def get_frame(image: LoadedImage, index: int = 0, plane: str = "axial") -> np.ndarray:
    """One 2-D frame: (H, W) float32 greyscale (real values) or (H, W, 3) uint8 colour."""
    if image.kind == "nifti":
        return slice_nifti(image, plane, index)
    frame = image.volume[_check_index(index, image.n_frames)]
    return frame if image.is_color else _real_values(image, frame)


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
    out = np.empty(frame.shape, np.uint8)
    step = max(1, WINDOW_CHUNK_PIXELS // max(frame.shape[1], 1))  # rows per chunk: no full-size temporaries
    for top in range(0, frame.shape[0], step):
        scaled = (frame[top : top + step].astype(np.float32) - low) / float(width) * 255.0
        out[top : top + step] = np.clip(np.rint(scaled), 0, 255)
    return out


def auto_contrast(
    frame: np.ndarray, percentiles: tuple[float, float] = AUTO_CONTRAST_PERCENTILES
) -> np.ndarray:
    """Stretch the (0.5, 99.5) percentile range to 0..255 (for MR, US and other non-HU data). (H, W) uint8.

    Frames over PERCENTILE_SAMPLE_PIXELS take the percentiles on a regular subsample (bounded memory).
    """
    stride = int(np.ceil(np.sqrt(frame.size / PERCENTILE_SAMPLE_PIXELS))) if frame.size else 1
    sample = frame[::stride, ::stride] if stride > 1 else frame
    low, high = (float(v) for v in np.percentile(sample, percentiles))
    if not np.isfinite([low, high]).all():  # values near the float limits overflow the interpolation
        low, high = float(np.min(frame)), float(np.max(frame))
    width = high - low
    if not width > 0:  # a flat frame, or one so far from 0 that low + 1 == low in float precision
        width = max(abs(low) * 1e-6, 1.0)
    return window(frame, center=low + width / 2.0, width=width)


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
