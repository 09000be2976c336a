"""Whole-volume segmentation: ask for a structure on every slice and assemble a 3-D mask on the source grid.

MedPLIB is a 2-D model; a volume is segmented slice by slice with the answer forced to `<SEG>` (as the
portal's Segment button does), through the Engine's public `set_image` / `ask` API. Slice handles (CLIP
features and, once computed, the SAM embedding) are kept in a bounded `SliceCache`, so a second question
on the same volume reuses each slice's embeddings instead of encoding it again.

Source grid:
- NIfTI: `engine.imageio` reorients to RAS+ for display; the mask is mapped back to the file's own voxel
  order, so the written mask has exactly the source's shape and affine.
- DICOM: a multi-frame file or a folder of single-frame instances (sorted along the slice normal); the mask
  has one plane per source frame/instance, (F, Rows, Columns).

DICOM SEG out: DICOM input → a SEG on the source instances; NIfTI → a SEG over a Secondary Capture series
of the displayed slices (same windowing, same voxels: the display is flips and a transpose, no resampling),
placed in the patient by the NIfTI affine (`display_geometry`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from engine.dicomseg import SegFiles, SliceGeometry

logger = logging.getLogger(__name__)

SLICE_CACHE_ENTRIES = 256  # slice handles kept for reuse (a few MB each with the released model)
FORCED_SEG = "<SEG>"
Progress = Callable[[int, int], bool]  # (done, total) -> False to cancel


class VolumeError(ValueError):
    """The input is not a volume we can segment (wrong kind, plane, or an empty series)."""


class Cancelled(RuntimeError):
    """The progress callback asked to stop; `done` slices were segmented."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"cancelled after {done} of {total} slices")
        self.done, self.total = done, total


@dataclass(frozen=True, eq=False)
class VolumeMask:
    """A 3-D mask on the source grid and how it was made.

    mask: bool, NIfTI → the file's own (X, Y, Z) voxel order; DICOM → (F, Rows, Columns).
    affine: the NIfTI file's (4, 4) affine, else None. voxel_ml: volume of one voxel in mL, or None.
    seconds_per_slice: mean wall time per slice (reused embeddings make a second run faster).
    """

    mask: np.ndarray
    affine: np.ndarray | None
    voxel_ml: float | None
    n_slices: int
    slices_with_mask: int
    seconds_per_slice: float
    plane: str
    label: str
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (row, col, slice) for DICOM NIfTI output

    @property
    def volume_ml(self) -> float | None:
        return None if self.voxel_ml is None else float(self.mask.sum()) * self.voxel_ml


class SliceCache:
    """LRU of engine image handles keyed by (volume key, plane, index)."""

    def __init__(self, max_entries: int = SLICE_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = 0

    def handle(self, engine: Any, key: Hashable, rgb: Callable[[], np.ndarray]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        handle = engine.set_image(rgb())
        self._items[key] = handle
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)
        return handle


def segment_label(question: str) -> str:
    """'Please segment the liver in this image.' → 'liver' (else the question itself, shortened)."""
    text = question.strip().rstrip(".?!")
    lower = text.lower()
    for start in ("please segment the ", "segment the ", "please segment ", "segment "):
        if lower.startswith(start):
            text = text[len(start) :]
            break
    for end in (" in this image", " in the image", " on this slice"):
        if text.lower().endswith(end):
            text = text[: -len(end)]
    return text[:64] or "segment"


def iter_slice_masks(
    engine: Any, n: int, slice_rgb: Callable[[int], np.ndarray], question: str, *, key: Hashable,
    cache: SliceCache | None = None, settings: Any = None,
) -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
    """Yield (index, (H, W) bool mask) for slices 0..n-1, the answer forced to `<SEG>`; stop iterating to cancel."""
    from engine.results import GenerationSettings

    settings = settings or GenerationSettings(max_new_tokens=8, force_answer=FORCED_SEG)
    cache = cache or SliceCache(max_entries=1)
    for index in range(n):
        handle = cache.handle(engine, (key, index), lambda i=index: slice_rgb(i))
        answer = engine.ask(handle, question, settings=settings)
        plane = answer.mask if answer.mask is not None else np.zeros(slice_rgb(index).shape[:2], bool)
        yield index, np.asarray(plane, bool)


def segment_slices(
    engine: Any, n: int, slice_rgb: Callable[[int], np.ndarray], question: str, *, key: Hashable,
    cache: SliceCache | None = None, progress: Progress | None = None, settings: Any = None,
) -> tuple[list[np.ndarray], float]:  # fmt: skip
    """Masks ((H, W) bool) of slices 0..n-1 and the mean seconds per slice; Cancelled when told to stop."""
    masks: list[np.ndarray] = []
    start = time.perf_counter()
    if progress is not None and progress(0, n) is False:
        raise Cancelled(0, n)
    for index, mask in iter_slice_masks(engine, n, slice_rgb, question, key=key, cache=cache, settings=settings):
        masks.append(mask)
        if progress is not None and progress(index + 1, n) is False and index + 1 < n:
            raise Cancelled(index + 1, n)
    return masks, (time.perf_counter() - start) / max(n, 1)


def segment_nifti(
    engine: Any, path: str | Path, question: str, *, plane: str = "axial", cache: SliceCache | None = None,
    progress: Progress | None = None,
) -> VolumeMask:  # fmt: skip
    """Segment every `plane` slice of a NIfTI volume; the mask has the file's shape (3-D) and affine."""
    from engine.imageio import read_image

    image = read_image(path)
    if image.kind != "nifti":
        raise VolumeError(f"{Path(path).name} is not NIfTI; use a NIfTI volume or a DICOM series")
    return segment_loaded_nifti(
        engine, image, nifti_affine(path), question, plane=plane, key=str(path), cache=cache, progress=progress
    )


def nifti_affine(path: str | Path) -> np.ndarray:
    """The (4, 4) affine of a NIfTI file as stored (the grid the 3-D mask is written on)."""
    import nibabel as nib

    return np.asarray(nib.load(str(path)).affine, float)


def segment_loaded_nifti(
    engine: Any, image: Any, source_affine: np.ndarray, question: str, *, plane: str = "axial",
    key: Hashable = "volume", cache: SliceCache | None = None, progress: Progress | None = None,
) -> VolumeMask:  # fmt: skip
    """As `segment_nifti`, for an `engine.imageio.LoadedImage` already read and its file's affine."""
    from engine.imageio import n_slices, to_rgb

    n = n_slices(image, plane)
    masks, per_slice = segment_slices(
        engine, n, lambda i: to_rgb(image, i, plane), question, key=(key, plane), cache=cache, progress=progress
    )
    return nifti_result(masks, image.volume.shape[:3], source_affine, plane, question, per_slice)


def nifti_result(masks: list[np.ndarray], ras_shape: tuple[int, ...], source_affine: np.ndarray, plane: str,
                 question: str, per_slice: float) -> VolumeMask:  # fmt: skip
    """Slice masks of a RAS+ volume → a VolumeMask in the source file's voxel order with its affine."""
    mask = from_canonical(assemble_ras(masks, ras_shape, plane), source_affine)
    zooms = np.sqrt((np.asarray(source_affine)[:3, :3] ** 2).sum(axis=0))
    return VolumeMask(
        mask=mask, affine=np.asarray(source_affine, float), voxel_ml=float(np.prod(zooms)) / 1000.0,
        n_slices=len(masks), slices_with_mask=sum(bool(m.any()) for m in masks), seconds_per_slice=per_slice,
        plane=plane, label=segment_label(question),
    )  # fmt: skip


def segment_frames(
    engine: Any, image: Any, question: str, *, header: Any = None, key: Hashable = "frames",
    cache: SliceCache | None = None, progress: Progress | None = None,
) -> VolumeMask:  # fmt: skip
    """Every frame of a loaded multi-frame DICOM (or photo stack): an (F, H, W) mask on its grid."""
    from engine.imageio import to_rgb

    masks, per_slice = segment_slices(
        engine, image.n_frames, lambda i: to_rgb(image, i), question, key=key, cache=cache, progress=progress
    )
    return frames_result(masks, per_slice, header, question)


def frames_result(masks: list[np.ndarray], per_slice: float, header: Any, question: str) -> VolumeMask:
    spacing = None if header is None else header.get("PixelSpacing")
    thickness = None if header is None else (header.get("SpacingBetweenSlices") or header.get("SliceThickness"))
    voxel_ml, grid = None, (1.0, 1.0, 1.0)
    if spacing and thickness:
        grid = (float(spacing[0]), float(spacing[1]), float(thickness))
        voxel_ml = float(np.prod(grid)) / 1000.0
    return VolumeMask(
        mask=np.stack(masks), affine=None, voxel_ml=voxel_ml, n_slices=len(masks),
        slices_with_mask=sum(bool(m.any()) for m in masks), seconds_per_slice=per_slice, plane="acquired",
        label=segment_label(question), spacing_mm=grid,
    )  # fmt: skip


def assemble_ras(masks: list[np.ndarray], shape: tuple[int, ...], plane: str) -> np.ndarray:
    """Put display-oriented slice masks back into the RAS+ (X, Y, Z) volume (inverse of imageio.slice_nifti)."""
    volume = np.zeros(shape, bool)
    for index, mask in enumerate(masks):
        back = np.asarray(mask, bool).T[::-1, ::-1]
        if plane == "axial":
            volume[:, :, index] = back
        elif plane == "coronal":
            volume[:, index, :] = back
        elif plane == "sagittal":
            volume[index, :, :] = back
        else:
            raise VolumeError(f"plane must be axial, coronal or sagittal, got {plane!r}")
    return volume


def display_slices(mask: np.ndarray, source_affine: np.ndarray, plane: str) -> np.ndarray:
    """A mask in the file's voxel order → (N, H, W) bool planes as the slices are displayed (inverse of
    `assemble_ras` + `from_canonical`; the same indexing as `imageio.slice_nifti`)."""
    import nibabel as nib

    ras = nib.orientations.apply_orientation(np.asarray(mask, bool), nib.orientations.io_orientation(source_affine))
    if plane == "axial":
        return np.stack([ras[::-1, ::-1, k].T for k in range(ras.shape[2])])
    if plane == "coronal":
        return np.stack([ras[::-1, k, ::-1].T for k in range(ras.shape[1])])
    if plane == "sagittal":
        return np.stack([ras[k, ::-1, ::-1].T for k in range(ras.shape[0])])
    raise VolumeError(f"plane must be axial, coronal or sagittal, got {plane!r}")


# The RAS+ voxel axes along a displayed slice's columns, rows and normal (imageio.slice_nifti walks the column
# and row axes backwards: pixel (r, c) of axial slice k is voxel (X-1-c, Y-1-r, k)).
_DISPLAY_AXES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}  # (column, row, normal) axes


def display_geometry(ras_affine: np.ndarray, ras_shape: tuple[int, ...], plane: str, index: int) -> SliceGeometry | None:
    """Where displayed slice `index` lies (engine.dicomseg.SliceGeometry, DICOM LPS mm), from the RAS+ affine.

    The display walks the column and row voxel axes backwards (imageio.slice_nifti), so +column = -axis and
    the first pixel is the last voxel on both. None when the affine is sheared (DICOM planes are orthogonal).
    """
    from engine.dicomseg import ORTHOGONAL_TOLERANCE, SliceGeometry

    col_axis, row_axis, normal_axis = _DISPLAY_AXES[plane]
    affine = np.asarray(ras_affine, float)
    first = np.zeros(3)
    first[col_axis], first[row_axis], first[normal_axis] = ras_shape[col_axis] - 1, ras_shape[row_axis] - 1, index
    to_lps = np.array([-1.0, -1.0, 1.0])  # NIfTI world is RAS, DICOM patient space is LPS
    along_col, along_row = -affine[:3, col_axis] * to_lps, -affine[:3, row_axis] * to_lps
    col_mm, row_mm = float(np.linalg.norm(along_col)), float(np.linalg.norm(along_row))
    row_cosine, column_cosine = along_col / col_mm, along_row / row_mm
    if abs(float(np.dot(row_cosine, column_cosine))) > ORTHOGONAL_TOLERANCE:
        return None
    return SliceGeometry(
        position=tuple((affine[:3, :3] @ first + affine[:3, 3]) * to_lps), row_cosine=tuple(row_cosine),
        column_cosine=tuple(column_cosine), spacing_mm=(row_mm, col_mm),
        thickness_mm=float(np.linalg.norm(affine[:3, normal_axis])),
    )  # fmt: skip


def write_nifti_seg(image: Any, result: VolumeMask, out: str | Path, *, model_name: str = "") -> SegFiles:
    """A NIfTI volume's 3-D mask as a multi-frame DICOM SEG over a Secondary Capture series of its slices.

    image: the `engine.imageio.LoadedImage` that was segmented; the SCs are `to_rgb` of each slice in
    `result.plane` (the windowing the model saw and the portal shows). Returns the SEG and SC folder paths.
    """
    from engine.dicomseg import write_seg_for_display_series
    from engine.imageio import n_slices, to_rgb

    if result.affine is None or image.kind != "nifti":
        raise VolumeError("a Secondary Capture series is written for a NIfTI volume only")
    plane, n = result.plane, n_slices(image, result.plane)
    planes = display_slices(result.mask, result.affine, plane)
    geometry = [display_geometry(image.affine, image.volume.shape[:3], plane, k) for k in range(n)]
    if any(g is None for g in geometry):
        raise VolumeError("the NIfTI affine is sheared and DICOM images must be orthogonal; save the mask as .nii.gz")
    rgbs = [to_rgb(image, k, plane) for k in range(n)]
    return write_seg_for_display_series(rgbs, planes, out, label=result.label, geometry=geometry,
                                        model_name=model_name, name=f"{plane} slices")  # fmt: skip


def from_canonical(canonical: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    """A RAS+ (closest canonical) array → the voxel order of the file whose affine is `source_affine`."""
    import nibabel as nib

    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    own = nib.orientations.io_orientation(np.asarray(source_affine))
    transform = nib.orientations.ornt_transform(ras, own)
    return nib.orientations.apply_orientation(canonical, transform).astype(bool)


def segment_dicom(
    engine: Any, path: str | Path, question: str, *, cache: SliceCache | None = None, progress: Progress | None = None
) -> tuple[VolumeMask, list]:
    """Segment every frame of a multi-frame DICOM file or every instance of a series folder.

    Returns the (F, Rows, Columns) mask and the sorted source datasets (for a SEG that references them).
    """
    from engine.dicomseg import read_sources
    from engine.imageio import read_image, to_rgb

    sources = read_sources(path)
    if len(sources) == 1:
        image = read_image(path if Path(path).is_file() else _first_file(path))
        frames = [lambda i=i: to_rgb(image, i) for i in range(image.n_frames)]
    else:
        frames = [lambda ds=ds: _dataset_rgb(ds) for ds in sources]
    masks, per_slice = segment_slices(
        engine, len(frames), lambda i: frames[i](), question, key=str(path), cache=cache, progress=progress
    )
    result = frames_result(masks, per_slice, sources[0], question)
    return result, sources


def _first_file(path: str | Path) -> Path:
    return sorted(p for p in Path(path).iterdir() if p.is_file())[0]


def _dataset_rgb(ds: Any) -> np.ndarray:
    """(H, W, 3) uint8 of one single-frame instance, windowed as `engine.imageio` windows a file."""
    import tempfile

    from engine.imageio import read_image, to_rgb

    with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
        ds.save_as(handle.name)
        return to_rgb(read_image(handle.name))


def save_volume_mask(result: VolumeMask, out: str | Path, *, sources: list | None = None, image: Any = None,
                     model_name: str = "") -> Path:  # fmt: skip
    """Write the 3-D mask as NIfTI (`.nii`/`.nii.gz`, the source affine) or DICOM SEG (`.dcm`).

    `.dcm`: with `sources` (DICOM input) a SEG on them; with `image` (the NIfTI LoadedImage that was
    segmented) a SEG over a Secondary Capture series written in `<out stem>-source-sc/`.
    """
    import nibabel as nib

    out = Path(out)
    if out.name.endswith((".nii", ".nii.gz")):
        affine, data = result.affine, result.mask
        if affine is None:  # DICOM (F, Rows, Columns) → (Columns, Rows, F) voxels with the pixel spacing
            affine, data = np.diag([*result.spacing_mm[::-1], 1.0]), np.transpose(result.mask, (2, 1, 0))
        nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(out))
        return out
    if out.suffix == ".dcm":
        if not sources and image is not None and result.affine is not None:
            return write_nifti_seg(image, result, out, model_name=model_name).seg
        if not sources:
            raise VolumeError("a DICOM SEG of a volume needs the DICOM series or the NIfTI image it was drawn on")
        from engine.dicomseg import build_seg

        build_seg(sources, result.mask, result.label, model_name).save_as(out)
        return out
    raise VolumeError(f"{out.name}: write the mask as .nii.gz, .nii or .dcm")
