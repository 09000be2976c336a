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
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
    import nibabel as nib

    from engine.imageio import read_image

    image = read_image(path)
    if image.kind != "nifti":
        raise VolumeError(f"{Path(path).name} is not NIfTI; use a NIfTI volume or a DICOM series")
    source = nib.load(str(path))
    return segment_loaded_nifti(
        engine, image, np.asarray(source.affine, float), question, plane=plane, key=str(path), cache=cache,
        progress=progress,
    )  # fmt: skip


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


def save_volume_mask(result: VolumeMask, out: str | Path, *, sources: list | None = None, model_name: str = "") -> Path:
    """Write the 3-D mask as NIfTI (`.nii`/`.nii.gz`, the source affine) or DICOM SEG (`.dcm`, DICOM input)."""
    import nibabel as nib

    out = Path(out)
    if out.name.endswith((".nii", ".nii.gz")):
        affine, data = result.affine, result.mask
        if affine is None:  # DICOM (F, Rows, Columns) → (Columns, Rows, F) voxels with the pixel spacing
            affine, data = np.diag([*result.spacing_mm[::-1], 1.0]), np.transpose(result.mask, (2, 1, 0))
        nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(out))
        return out
    if out.suffix == ".dcm":
        if not sources:
            raise VolumeError("a DICOM SEG of a volume needs DICOM input; write .nii.gz for a NIfTI volume")
        from engine.dicomseg import build_seg

        build_seg(sources, result.mask, result.label, model_name).save_as(out)
        return out
    raise VolumeError(f"{out.name}: write the mask as .nii.gz, .nii or .dcm")
