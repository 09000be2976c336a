"""Extract real 2-D medical images and binary masks bundled inside pip packages into an asset folder.

Everything is read offline from installed packages (nilearn, pydicom, scikit-image), except the stardist
data files, which are read with `zipfile` out of the wheel fetched by `pip download --no-deps stardist==0.9.2`
(stardist itself is never imported: it pulls in tensorflow). Masks are either shipped with the data
(MNI152 tissue priors, pydicom overlay, stardist labels) or derived by a classic, documented method; each
mask's method is stored next to it in `index.json` and summarised in `PROVENANCE.md`. Single-image sources
(pydicom's head CT slices, the fundus photograph, the phase image) are cut into tiles with a guard band
(`guarded_tiles`), so their tiles can go to different splits and every modality has val and test images.

Output layout, paths relative to the folder:
    images/<id>.png             (H, W) L or (H, W, 3) RGB uint8, longest side <= MAX_SIDE
    masks/<id>--<label>.png     (H, W) L uint8 with values {0, 255}, same size as its image
    regions/<id>--<label>--<kind>.png   region prompts, same format: a "point" square and a "box" per mask,
                                and a "background" point square that touches no mask
    index.json                  list of records, see `_record`
    PROVENANCE.md               sources, licences, mask methods, split rule, counts

Usage: `python -m training.sources --out assets/medimages [--stardist-wheel PATH]`. Deterministic: running it
twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

log = logging.getLogger(__name__)

MAX_SIDE = 256  # longest side of every written image, px (keeps the repo small)
POINT_HALF_PX = 6  # a "point" region prompt is a (2*6+1)-px square (MedPLIB's demo uses +-20 px at full size)
MIN_MASK_PIXELS = 40  # masks smaller than this (after resizing) are dropped
MNI_STEP_MM = 4  # distance between extracted MNI152 slices
MNI_MIN_BRAIN_PIXELS = 2500  # slices whose brain mask is smaller than this are skipped
STARDIST_REQUIREMENT = "stardist==0.9.2"
SYNTHETIC_SEED = 1234
SYNTHETIC_LESION_VALUE = 70.0  # uint8 grey level of a synthetic lesion core (white matter is ~230)
SPLITS = ("train", "val", "test")
VAL_START, TEST_START, HELD_OUT_FRACTION = 0.30, 0.65, 0.15

LICENCE = {
    "nilearn": "BSD-3-Clause (nilearn); MNI ICBM152 2009 template: permissive MNI/McGill notice (see PROVENANCE.md)",
    "pydicom": "MIT (pydicom); test file believed free of restrictions (pydicom test-file notice)",
    "skimage-cc0": "CC0 (scikit-image data); code BSD-3-Clause",
    "skimage-bsd": "BSD-3-Clause (scikit-image data licence)",
    "stardist": "BSD-3-Clause (stardist); data from the 2018 Data Science Bowl (nuclei) / TCIA (H&E)",
}


@dataclass(frozen=True)
class MaskSpec:
    """One named binary mask. `mask` is (H, W) bool at the size of its image."""

    label: str
    mask: np.ndarray
    method: str


@dataclass(frozen=True)
class Extracted:
    """One 2-D image cut from a source, before resizing and writing.

    `image` is (H, W) or (H, W, 3) uint8. `unit` orders the source slices/tiles inside `split_stratum`
    (the source volume/image, plus the plane for volumes); splits are contiguous ranges of units.
    """

    key: str
    image: np.ndarray
    masks: tuple[MaskSpec, ...]
    modality: str
    organ: str | None
    plane: str | None
    package: str
    file: str
    slice: str
    source_group: str
    unit: int
    licence: str
    spacing_mm: tuple[float, float] | None
    synthetic: bool = False

    @property
    def split_stratum(self) -> str:
        return f"{self.source_group}|{self.plane or '-'}"


# ----------------------------------------------------------------------------------------------- helpers


def to_uint8(values: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Percentile window of any numeric array to uint8 (same shape)."""
    lo, hi = np.percentile(values, [low_pct, high_pct])
    scaled = np.clip((values.astype(np.float64) - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> the largest 8-connected component (empty stays empty)."""
    labels, count = ndi.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return mask.astype(bool)
    sizes = ndi.sum(mask, labels, index=range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def drop_small(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """(H, W) bool -> the same mask without 8-connected components smaller than `min_pixels`."""
    labels, count = ndi.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return mask.astype(bool)
    sizes = np.asarray(ndi.sum(mask, labels, index=range(1, count + 1)))
    keep = np.concatenate([[False], sizes >= min_pixels])
    return keep[labels]


def foreground(image: np.ndarray, threshold: float) -> np.ndarray:
    """Body/object outline: `image > threshold`, largest component, holes filled. (H, W) bool."""
    return ndi.binary_fill_holes(largest_component(image > threshold))


def grid_tiles(height: int, width: int, rows: int, cols: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Disjoint tiles covering (height, width): yields (unit, row0, row1, col0, col1) in raster order."""
    for r in range(rows):
        for c in range(cols):
            yield (r * cols + c, r * height // rows, (r + 1) * height // rows,
                   c * width // cols, (c + 1) * width // cols)


def guarded_tiles(height: int, width: int, rows: int, cols: int,
                  guard: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Like `grid_tiles`, but every inner edge gives up `guard` // 2 px on each side: neighbouring tiles are
    `guard` px apart, so no pixel, and no structure narrower than the guard band, is in two tiles (and, after
    `assign_splits`, in two splits)."""
    half = guard // 2
    for unit, r0, r1, c0, c1 in grid_tiles(height, width, rows, cols):
        yield (unit, r0 + (half if r0 else 0), r1 - (half if r1 < height else 0),
               c0 + (half if c0 else 0), c1 - (half if c1 < width else 0))


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (H, W[, 3]) uint8 to (rows, cols) with Lanczos (a no-op copy at the same size)."""
    if image.shape[:2] == size:
        return image.copy()
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.LANCZOS))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a (H, W) bool mask to (rows, cols): bilinear on 0/255, then >= 128. Returns bool."""
    if mask.shape == size:
        return mask.astype(bool)
    as_u8 = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(as_u8.resize((size[1], size[0]), Image.Resampling.BILINEAR)) >= 128


def fitted_size(height: int, width: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(rows, cols) with the longest side at most `max_side`, aspect ratio kept."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values))


# ----------------------------------------------------------------------------------------------- nilearn


MNI_PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}  # plane -> array axis of the RAS volume


def _mni_volumes() -> dict[str, np.ndarray]:
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1).get_fdata()
    return {
        "t1": t1,
        "brain": datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0.5,
        "grey matter": datasets.load_mni152_gm_template(resolution=1).get_fdata() >= 0.5,
        "white matter": datasets.load_mni152_wm_template(resolution=1).get_fdata() >= 0.5,
    }


def _mni_cut(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice a RAS volume and rotate so superior (or anterior, for axial) is up."""
    return np.rot90(np.take(volume, index, axis=axis))


MNI_METHODS = {
    "brain": "nilearn load_mni152_brain_mask (ICBM152 2009 brain mask, threshold 0.2)",
    "grey matter": "ICBM152 2009 grey-matter probability map (nilearn load_mni152_gm_template) >= 0.5",
    "white matter": "ICBM152 2009 white-matter probability map (nilearn load_mni152_wm_template) >= 0.5",
}


def extract_mni152() -> list[Extracted]:
    """MNI152 T1 1 mm slices every MNI_STEP_MM mm in three planes, with brain / grey / white matter masks."""
    vols = _mni_volumes()
    t1_u8 = to_uint8(vols["t1"], 0.0, 99.8)
    items = []
    for plane, axis in MNI_PLANES.items():
        areas = vols["brain"].sum(axis=tuple(a for a in range(3) if a != axis))
        candidates = np.flatnonzero(areas >= MNI_MIN_BRAIN_PIXELS)
        for index in range(int(candidates[0]), int(candidates[-1]) + 1, MNI_STEP_MM):
            masks = tuple(MaskSpec(label, _mni_cut(vols[label], axis, index), MNI_METHODS[label])
                          for label in ("brain", "grey matter", "white matter"))
            items.append(Extracted(
                key=f"mri-mni152-{plane}-{index:03d}", image=_mni_cut(t1_u8, axis, index), masks=masks,
                modality="MRI", organ="brain", plane=plane, package="nilearn",
                file="datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                slice=f"{plane} index {index} (axis {axis})", source_group="nilearn:MNI152-2009-T1-1mm",
                unit=index, licence=LICENCE["nilearn"], spacing_mm=(1.0, 1.0)))
    return items


def add_synthetic_lesions(items: list[Extracted], every: int = 3) -> list[Extracted]:
    """Blend a dark (T1-hypointense) round synthetic 'lesion' into white matter of every `every`-th axial MNI slice.

    The result is a new record (synthetic=True) on the same source slice, so it always lands in the same
    split as its parent. Position and radius come from a generator seeded by SYNTHETIC_SEED + slice index.
    """
    out = []
    axial = [it for it in items if it.plane == "axial" and it.source_group.startswith("nilearn:MNI152")]
    for parent in axial[1::every]:
        wm = {m.label: m.mask for m in parent.masks}["white matter"]
        inner = ndi.binary_erosion(wm, iterations=6)
        if inner.sum() < 50:
            continue
        rng = np.random.default_rng(SYNTHETIC_SEED + parent.unit)
        rows, cols = np.nonzero(inner)
        pick = int(rng.integers(len(rows)))
        radius = float(rng.uniform(4.0, 8.0))
        yy, xx = np.mgrid[: wm.shape[0], : wm.shape[1]]
        dist = np.hypot(yy - rows[pick], xx - cols[pick])
        lesion = dist <= radius
        blend = np.clip(1.3 - dist / radius, 0.0, 1.0)  # soft edge, full contrast in the core
        image = parent.image.astype(np.float64) * (1 - blend) + SYNTHETIC_LESION_VALUE * blend
        method = (f"SYNTHETIC: dark disc of radius {radius:.1f} px blended into white matter "
                  f"(numpy seed {SYNTHETIC_SEED}+slice); the mask is the disc")
        out.append(Extracted(
            key=parent.key + "-synthetic-lesion", image=np.round(image).astype(np.uint8),
            masks=(MaskSpec("lesion", lesion, method), *parent.masks[:1]), modality="MRI", organ="brain",
            plane="axial", package=parent.package, file=parent.file, slice=parent.slice,
            source_group=parent.source_group, unit=parent.unit, licence=parent.licence,
            spacing_mm=parent.spacing_mm, synthetic=True))
    return out


# ----------------------------------------------------------------------------------------------- pydicom


def _dicom(name: str):
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name!r} is not installed; reinstall pydicom==3.0.2")
    return pydicom.dcmread(path)


def _spacing(ds) -> tuple[float, float] | None:
    spacing = ds.get("PixelSpacing")
    return (float(spacing[0]), float(spacing[1])) if spacing else None


def _pydicom_item(name: str, key: str, image: np.ndarray, masks: tuple[MaskSpec, ...], ds, **kw) -> Extracted:
    fields = {"modality": "MRI", "organ": None, "plane": "axial", "slice": "frame 0", "unit": 0,
              "spacing_mm": _spacing(ds)} | kw
    return Extracted(key=key, image=image, masks=masks, package="pydicom", file=f"data/test_files/{name}",
                     source_group=f"pydicom:{name}", licence=LICENCE["pydicom"], **fields)


def extract_liver_lesion_mr() -> Extracted:
    """Abdominal MR with the overlay contour (group 0x6000) around a liver lesion, filled into a mask."""
    ds = _dicom("examples_overlay.dcm")
    pixels = ds.pixel_array.astype(np.float64)
    lesion = ndi.binary_fill_holes(ds.overlay_array(0x6000) > 0)
    body = foreground(ndi.gaussian_filter(pixels, 2.0), otsu(pixels) * 0.5)
    masks = (
        MaskSpec("liver lesion", lesion, "DICOM overlay 0x6000 contour drawn in the file, holes filled "
                 "(scipy.ndimage.binary_fill_holes)"),
        MaskSpec("body", body, "DERIVED: Gaussian(2 px) image > 0.5 x Otsu, largest component, holes filled"),
    )
    return _pydicom_item("examples_overlay.dcm", "mri-pydicom-liver-lesion", to_uint8(pixels), masks, ds,
                         organ="abdomen")


def extract_ct_spine() -> Extracted:
    """CT_small: axial CT at the spine; body outline and bone by Hounsfield thresholds."""
    ds = _dicom("CT_small.dcm")
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    body = foreground(hu, -300.0)
    bone = drop_small((hu >= 250.0) & body, 20)
    image = np.round(np.clip((hu - (40 - 200)) / 400.0, 0, 1) * 255).astype(np.uint8)  # window L40/W400
    masks = (
        MaskSpec("body", body, "DERIVED: HU > -300, largest component, holes filled"),
        MaskSpec("bone", bone, "DERIVED: HU >= 250 inside the body, components >= 20 px"),
    )
    return _pydicom_item("CT_small.dcm", "ct-pydicom-spine", image, masks, ds, modality="CT", organ="spine")


HEAD_CT_FILES = ("J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm")  # pydicom's two 512x512 head CT slices


def extract_head_ct() -> list[Extracted]:
    """pydicom's two 512x512 axial head CT slices (JPEG 2000), each cut into 2x2 tiles with a guard band (one
    slice per file: its tiles are the split units); head outline and bone by Hounsfield thresholds."""
    items = []
    for name in HEAD_CT_FILES:
        ds = _dicom(name)
        try:
            raw = ds.pixel_array.astype(np.float64)
        except (RuntimeError, NotImplementedError, ValueError) as err:
            log.warning("%s does not decode here (%s); skipped", name, err)
            continue
        hu = raw * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        head = foreground(ndi.gaussian_filter(hu, 1.0), -300.0)
        bone = drop_small((hu >= 250.0) & head, 30)
        image = np.round(np.clip((hu - (40 - 200)) / 400.0, 0, 1) * 255).astype(np.uint8)  # window L40/W400
        stem = name.removesuffix(".dcm").lower().replace("_", "-")
        for unit, r0, r1, c0, c1 in guarded_tiles(*hu.shape, rows=2, cols=2, guard=TILE_GUARD_PX):
            masks = (
                MaskSpec("body", head[r0:r1, c0:c1], "DERIVED: Gaussian(1 px) HU > -300, largest component, holes "
                         "filled (whole slice); then cut into tiles"),
                MaskSpec("bone", bone[r0:r1, c0:c1], "DERIVED: HU >= 250 inside the body, components >= 30 px "
                         "(whole slice); then cut into tiles"),
            )
            items.append(_pydicom_item(name, f"ct-pydicom-head-{stem}-tile{unit}", image[r0:r1, c0:c1], masks,
                                       ds, modality="CT", organ="head", slice=f"tile rows {r0}-{r1} cols {c0}-{c1}",
                                       unit=unit))
    return items


def extract_mr_small() -> Extracted:
    """MR_small: 64x64 MR slice; foreground outline by Otsu."""
    ds = _dicom("MR_small.dcm")
    pixels = ds.pixel_array.astype(np.float64)
    smooth = ndi.gaussian_filter(pixels, 1.0)
    body = foreground(smooth, otsu(smooth) * 0.6)
    masks = (MaskSpec("body", body, "DERIVED: Gaussian(1 px) image > 0.6 x Otsu, largest component, "
                      "holes filled"),)
    return _pydicom_item("MR_small.dcm", "mri-pydicom-small", to_uint8(pixels), masks, ds, plane=None)


def extract_bone_scan() -> list[Extracted]:
    """JPEG2000.dcm whole-body bone scintigraphy (NM), cut into four disjoint 256x256 tiles head to feet.

    Skipped (with a warning) when this Pillow cannot decode JPEG 2000.
    """
    ds = _dicom("JPEG2000.dcm")
    try:
        pixels = ds.pixel_array.astype(np.float64)
    except (RuntimeError, NotImplementedError, ValueError) as err:
        log.warning("JPEG2000.dcm does not decode here (%s); the nuclear-medicine images are skipped", err)
        return []
    image = to_uint8(pixels, 0.0, 99.9)
    smooth = ndi.gaussian_filter(pixels, 3.0)
    body = ndi.binary_fill_holes(drop_small(smooth > np.percentile(pixels, 60), 500))
    hot = drop_small(smooth > np.percentile(smooth[body], 99.0), 15) & body
    items = []
    for unit, r0, r1, c0, c1 in grid_tiles(*pixels.shape, rows=4, cols=1):
        masks = (
            MaskSpec("body", body[r0:r1, c0:c1], "DERIVED: Gaussian(3 px) counts > 60th percentile, "
                     "components >= 500 px, holes filled"),
            MaskSpec("high tracer uptake", hot[r0:r1, c0:c1], "DERIVED: Gaussian(3 px) counts > 99th "
                     "percentile of the body, components >= 15 px"),
        )
        items.append(_pydicom_item(
            "JPEG2000.dcm", f"nm-pydicom-bonescan-tile{unit}", image[r0:r1, c0:c1], masks, ds,
            modality="nuclear medicine", organ="whole body", plane="coronal",
            slice=f"rows {r0}-{r1}", unit=unit))
    return items


# ----------------------------------------------------------------------------------------------- scikit-image


def _skimage_item(name: str, key: str, image: np.ndarray, masks: tuple[MaskSpec, ...], **kw) -> Extracted:
    fields = {"plane": None, "slice": "full image", "unit": 0, "spacing_mm": None, "organ": None} | kw
    return Extracted(key=key, image=image, masks=masks, package="scikit-image", file=f"skimage/data/{name}",
                     source_group=f"scikit-image:{name}", **fields)


RETINA_WORK_SIDE = 3 * MAX_SIDE  # the fundus photograph is downsized to this before its 3x3 tiles are cut
RETINA_BACKGROUND_SIGMA = 25.0  # px at RETINA_WORK_SIDE: the slow illumination taken off the green channel
RETINA_VESSEL_SIGMAS = (1.5, 2.5, 3.5)  # Sato scales, px at RETINA_WORK_SIDE (vessels about 3-9 px wide there)
RETINA_HYSTERESIS_PERCENTILES = (85.0, 95.0)  # of the ridge response in the field of view: (low, high)
TILE_GUARD_PX = 16  # guard band between the tiles of a single-image source (`guarded_tiles`)


def extract_retina() -> list[Extracted]:
    """Fundus photograph (CC0), downsized to RETINA_WORK_SIDE and cut into 3x3 tiles with a guard band (the only
    fundus image: its tiles are the split units); vessels by Sato ridge filter, optic disc by brightness, both
    found on the whole image before cutting.

    Vessels: the green channel less its Gaussian(25 px) background (the fundus is brighter near the disc), Sato at
    sigmas 1.5-3.5 px, and a hysteresis threshold between the 85th and 95th percentiles of the ridge response in
    the field of view, so a faint vessel is kept where it joins a clear one. Until issue 20's second release the
    mask was the response above one Otsu threshold, components >= 150 px: that kept only the widest vessels and
    left most vessels a viewer sees unmarked (2 of about 10 on the test tile), which no model can learn."""
    from skimage import data, filters

    rgb = resize_to(data.retina(), fitted_size(*data.retina().shape[:2], RETINA_WORK_SIDE))
    green = rgb[..., 1].astype(np.float64) / 255.0
    fov = ndi.binary_erosion(foreground(rgb[..., 0].astype(np.float64), 20.0), iterations=12)
    flat = green - ndi.gaussian_filter(green, RETINA_BACKGROUND_SIGMA)
    ridges = filters.sato(flat, sigmas=RETINA_VESSEL_SIGMAS, black_ridges=True) * fov
    low, high = np.percentile(ridges[fov], RETINA_HYSTERESIS_PERCENTILES)
    vessels = drop_small(filters.apply_hysteresis_threshold(ridges, low, high), 80)
    lum = ndi.gaussian_filter(rgb.astype(np.float64).mean(axis=2), 12.0)
    disc = largest_component((lum > np.percentile(lum[fov], 99.0)) & fov)
    disc = ndi.binary_dilation(disc, iterations=9)
    items = []
    for unit, r0, r1, c0, c1 in guarded_tiles(*rgb.shape[:2], rows=3, cols=3, guard=TILE_GUARD_PX):
        masks = (
            MaskSpec("retinal vessels", vessels[r0:r1, c0:c1], "DERIVED: Sato ridge filter (sigmas 1.5,2.5,3.5; "
                     f"dark ridges) on the green channel of the {RETINA_WORK_SIDE}-px image less its Gaussian(25 px) "
                     "background, inside the field of view; hysteresis threshold between the 85th and 95th "
                     "percentiles of the response in the field of view, components >= 80 px; then cut into tiles"),
            MaskSpec("optic disc", disc[r0:r1, c0:c1], "DERIVED: brightest 1% of the Gaussian(12 px) luminance "
                     "inside the field of view, largest component, dilated 9 px; then cut into tiles"),
        )
        items.append(_skimage_item(
            "retina.jpg", f"fundus-skimage-retina-tile{unit}", rgb[r0:r1, c0:c1].copy(), masks,
            modality="fundus photography", organ="eye", slice=f"tile rows {r0}-{r1} cols {c0}-{c1} of "
            f"{rgb.shape[0]}x{rgb.shape[1]}", unit=unit, licence=LICENCE["skimage-cc0"]))
    return items


def extract_ihc() -> list[Extracted]:
    """Colon IHC (DAB + haematoxylin) 512x512 cut into four native 256x256 tiles; masks by colour deconvolution."""
    from skimage import color, data

    rgb = data.immunohistochemistry()
    hed = color.rgb2hed(rgb)
    dab = drop_small(hed[..., 2] > otsu(hed[..., 2]), 20)
    haem = ndi.gaussian_filter(hed[..., 0], 1.0)
    nuclei = drop_small((haem > otsu(haem)) & ~ndi.binary_dilation(dab, iterations=2), 20)
    items = []
    for unit, r0, r1, c0, c1 in grid_tiles(*rgb.shape[:2], rows=2, cols=2):
        masks = (
            MaskSpec("DAB-positive staining", dab[r0:r1, c0:c1], "DERIVED: colour deconvolution "
                     "(skimage.color.rgb2hed) DAB channel > Otsu of the whole image, components >= 20 px"),
            MaskSpec("nuclei", nuclei[r0:r1, c0:c1], "DERIVED: Gaussian(1 px) haematoxylin channel of rgb2hed > "
                     "Otsu of the whole image, outside the DAB mask dilated 2 px, components >= 20 px "
                     "(counterstained nuclei; nuclei under DAB are missed)"),
        )
        items.append(_skimage_item(
            "immunohistochemistry.png", f"ihc-skimage-colon-tile{unit}", rgb[r0:r1, c0:c1], masks,
            modality="histopathology", organ="colon", slice=f"tile rows {r0}-{r1} cols {c0}-{c1}", unit=unit,
            licence=LICENCE["skimage-bsd"]))
    return items


def extract_cell() -> list[Extracted]:
    """Quantitative phase image of a cell in saline (CC0), the only phase image, with one cell: the cell by Otsu on
    the whole image, then a square window centred on the cell (twice its diameter, inside the image) cut into 2x2
    tiles with a guard band, so every tile (a split unit) holds a quarter of the cell and its surroundings."""
    from skimage import data

    gray = data.cell()
    smooth = ndi.gaussian_filter(gray.astype(np.float64), 4.0)
    cell = foreground(smooth, otsu(smooth) + 0.5 * smooth.std())
    rows, cols = np.nonzero(cell)
    cy, cx = int(rows.mean()), int(cols.mean())
    half = min(int(rows.max() - rows.min()), cy, cx, gray.shape[0] - cy, gray.shape[1] - cx)
    window = (slice(cy - half, cy + half), slice(cx - half, cx + half))
    image, cell = gray[window], cell[window]
    items = []
    for unit, r0, r1, c0, c1 in guarded_tiles(*image.shape, rows=2, cols=2, guard=TILE_GUARD_PX):
        masks = (MaskSpec("cell", cell[r0:r1, c0:c1], "DERIVED: Gaussian(4 px) > Otsu + 0.5 SD, largest "
                          "component, holes filled (whole image); then cut into tiles"),)
        where = f"tile rows {cy - half + r0}-{cy - half + r1} cols {cx - half + c0}-{cx - half + c1}"
        items.append(_skimage_item("cell.png", f"phase-skimage-cell-tile{unit}", image[r0:r1, c0:c1].copy(), masks,
                                   modality="phase microscopy", slice=where, unit=unit,
                                   licence=LICENCE["skimage-cc0"]))
    return items


# ----------------------------------------------------------------------------------------------- stardist


def download_stardist_wheel(dest: Path) -> Path:
    """`pip download --no-deps stardist==0.9.2` into `dest`; returns the wheel path (never imported)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", STARDIST_REQUIREMENT, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(glob.glob(str(dest / "stardist-*.whl")))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {STARDIST_REQUIREMENT} ({result.stderr.strip()[-300:]}); "
                           "download it yourself and pass --stardist-wheel PATH")
    return Path(wheels[0])


def _wheel_image(wheel: zipfile.ZipFile, name: str) -> np.ndarray:
    with Image.open(io.BytesIO(wheel.read(f"stardist/data/images/{name}"))) as im:
        return np.asarray(im)


def _stardist_item(name: str, key: str, image: np.ndarray, masks: tuple[MaskSpec, ...], **kw) -> Extracted:
    return Extracted(key=key, image=image, masks=masks, organ=None, plane=None, package=STARDIST_REQUIREMENT,
                     file=f"stardist/data/images/{name}", source_group=f"stardist:{name}",
                     licence=LICENCE["stardist"], spacing_mm=None, **kw)


def extract_stardist(wheel_path: Path) -> list[Extracted]:
    """Fluorescence nuclei (2018 DSB) in 16 native 128x128 tiles with the union of the instance labels,
    and the H&E image (TCIA) in four 150x250 tiles with haematoxylin-positive nuclei."""
    from skimage import color

    with zipfile.ZipFile(wheel_path) as wheel:
        fluo, labels, he = (_wheel_image(wheel, n) for n in ("img2d.tif", "mask2d.tif", "histo.jpg"))
    fluo_u8, nuclei = to_uint8(fluo, 0.0, 99.8), labels > 0
    items = []
    for unit, r0, r1, c0, c1 in grid_tiles(*fluo.shape, rows=4, cols=4):
        masks = (MaskSpec("nuclei", nuclei[r0:r1, c0:c1], "stardist mask2d.tif instance labels > 0 (union "
                          "of the annotated nuclei)"),)
        items.append(_stardist_item("img2d.tif", f"fluo-stardist-nuclei-tile{unit:02d}", fluo_u8[r0:r1, c0:c1],
                                    masks, modality="fluorescence microscopy", unit=unit,
                                    slice=f"tile rows {r0}-{r1} cols {c0}-{c1}"))
    haem = ndi.gaussian_filter(color.rgb2hed(he)[..., 0], 1.0)
    he_nuclei = drop_small(haem > otsu(haem), 15)
    for unit, r0, r1, c0, c1 in grid_tiles(*he.shape[:2], rows=2, cols=2):
        masks = (MaskSpec("nuclei", he_nuclei[r0:r1, c0:c1], "DERIVED: Gaussian(1 px) haematoxylin channel "
                          "of colour deconvolution (skimage.color.rgb2hed) > Otsu, components >= 15 px"),)
        items.append(_stardist_item("histo.jpg", f"he-stardist-histo-tile{unit}", he[r0:r1, c0:c1].copy(),
                                    masks, modality="histopathology", unit=unit,
                                    slice=f"tile rows {r0}-{r1} cols {c0}-{c1}"))
    return items


# ----------------------------------------------------------------------------------------------- all sources


def extract_all(stardist_wheel: Path) -> list[Extracted]:
    """Every extracted image from every source, in a fixed order."""
    steps: list[Callable[[], list[Extracted] | Extracted]] = [
        extract_mni152, extract_liver_lesion_mr, extract_ct_spine, extract_head_ct, extract_mr_small,
        extract_bone_scan,
        extract_retina, extract_ihc, extract_cell, lambda: extract_stardist(stardist_wheel),
    ]
    items: list[Extracted] = []
    for step in steps:
        got = step()
        items.extend(got if isinstance(got, list) else [got])
        log.info("extracted %d images so far", len(items))
    items.extend(add_synthetic_lesions(items))
    return items


def assign_splits(items: list[Extracted]) -> dict[str, str]:
    """Split by source slice: key -> 'train' | 'val' | 'test'.

    Inside each stratum (source image/volume, and plane for volumes) the distinct units (slice index or tile)
    are sorted; a contiguous block of ~15% starting at 30% goes to val and one starting at 65% to test, the
    rest to train. Strata with fewer than 3 units go to train, so no source slice is ever in two splits.
    """
    strata: dict[str, list[int]] = {}
    for it in items:
        strata.setdefault(it.split_stratum, []).append(it.unit)
    unit_split: dict[tuple[str, int], str] = {}
    for stratum, units in strata.items():
        ordered = sorted(set(units))
        n, block = len(ordered), max(1, round(len(set(units)) * HELD_OUT_FRACTION))
        val0, test0 = int(n * VAL_START), int(n * TEST_START)
        for pos, unit in enumerate(ordered):
            held = n >= 3 and (val0 <= pos < val0 + block or test0 <= pos < test0 + block)
            unit_split[(stratum, unit)] = ("val" if pos < test0 else "test") if held else "train"
    return {it.key: unit_split[(it.split_stratum, it.unit)] for it in items}


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label.lower()).strip("_")


def _write_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", optimize=True)


def write_item(item: Extracted, out: Path, split: str) -> dict | None:
    """Resize `item` to at most MAX_SIDE, write its PNGs under `out`, return its index record (None if no
    mask survives)."""
    size = fitted_size(*item.image.shape[:2])
    masks = [(m, resize_mask(m.mask, size)) for m in item.masks]
    masks = [(m, arr) for m, arr in masks if arr.sum() >= MIN_MASK_PIXELS]
    if not masks:
        log.warning("%s: no mask of at least %d px; skipped", item.key, MIN_MASK_PIXELS)
        return None
    image_rel = f"images/{item.key}.png"
    _write_png(resize_to(item.image, size), out / image_rel)
    mask_records = []
    for spec, arr in masks:
        rel = f"masks/{item.key}--{_slug(spec.label)}.png"
        _write_png(arr.astype(np.uint8) * 255, out / rel)
        regions = {kind: _write_region(region, out, f"{item.key}--{_slug(spec.label)}--{kind}")
                   for kind, region in prompt_regions(arr).items()}
        mask_records.append({"label": spec.label, "path": rel, "method": spec.method, "regions": regions})
    record = _record(item, image_rel, mask_records, size, split)
    background = background_region(np.any([arr for _, arr in masks], axis=0))
    record["background_region"] = (None if background is None
                                   else _write_region(background, out, f"{item.key}--background--point"))
    return record


def _write_region(region: np.ndarray, out: Path, name: str) -> str:
    rel = f"regions/{name}.png"
    _write_png(region.astype(np.uint8) * 255, out / rel)
    return rel


def square(shape: tuple[int, int], row: int, col: int, half: int = POINT_HALF_PX) -> np.ndarray:
    """(H, W) bool with a (2*half+1)-px square around (row, col), clipped to the image (a "point" prompt)."""
    region = np.zeros(shape, dtype=bool)
    region[max(0, row - half): row + half + 1, max(0, col - half): col + half + 1] = True
    return region


def prompt_regions(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Region prompts for a (H, W) bool mask, as a user would draw them on its largest component.

    "point": a square around the innermost pixel (maximum of the distance transform); "box": the
    bounding box (rows and columns the right way round, not MedPLIB's swapped demo box). The mask itself
    serves as the "sketch" prompt, so it is not written again.
    """
    part = largest_component(mask)
    depth = ndi.distance_transform_edt(part)
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    rows, cols = np.nonzero(part)
    box = np.zeros_like(part)
    box[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1] = True
    return {"point": square(mask.shape, int(row), int(col)), "box": box}


def background_region(union: np.ndarray) -> np.ndarray | None:
    """A point square that touches none of the masks (kept >= 3 px away), or None if none fits. (H, W) bool."""
    free = ~ndi.binary_dilation(union, iterations=3)
    free[0, :] = free[-1, :] = free[:, 0] = free[:, -1] = False
    depth = ndi.distance_transform_edt(free)
    if depth.max() <= POINT_HALF_PX * 1.5:
        return None
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return square(union.shape, int(row), int(col))


def _record(item: Extracted, image_rel: str, masks: list[dict], size: tuple[int, int], split: str) -> dict:
    """The index.json record of one written image."""
    spacing = None
    if item.spacing_mm is not None:
        factor = item.image.shape[0] / size[0], item.image.shape[1] / size[1]
        spacing = [round(item.spacing_mm[0] * factor[0], 4), round(item.spacing_mm[1] * factor[1], 4)]
    return {
        "id": item.key, "image": image_rel, "masks": masks, "modality": item.modality, "organ": item.organ,
        "plane": item.plane, "source": {"package": item.package, "file": item.file, "slice": item.slice},
        "source_group": item.source_group, "split_unit": item.unit, "split": split, "licence": item.licence,
        "synthetic": item.synthetic, "spacing_mm": spacing, "size": list(size),
    }


def write_assets(items: list[Extracted], out: Path) -> list[dict]:
    """Write images, masks, index.json and PROVENANCE.md under `out` (images/ and masks/ are rebuilt)."""
    for sub in ("images", "masks", "regions"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    splits = assign_splits(items)
    records = [r for it in items if (r := write_item(it, out, splits[it.key])) is not None]
    records.sort(key=lambda r: r["id"])
    (out / "index.json").write_text(json.dumps(records, indent=1) + "\n")
    (out / "PROVENANCE.md").write_text(provenance_markdown(records))
    return records


PROVENANCE_HEADER = """# Provenance of assets/medimages

Generated by `python -m training.sources --out assets/medimages` (do not edit by hand; edit
`training/sources.py` and re-run). Every image is a DERIVED 2-D cut (slice, tile or downsized copy, longest
side <= {max_side} px) of an image shipped inside a pip package; nothing was downloaded except the stardist
wheel (`pip download --no-deps {stardist}`, read with zipfile; stardist is never imported).

## Sources and licences

| source | package / file | licence and notice |
|---|---|---|
| MNI ICBM152 2009 T1 template, 1 mm, with brain mask and GM/WM probability maps | nilearn `datasets/data/` | nilearn: BSD-3-Clause. Template: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University. Permission to use, copy, modify, and distribute this software and its documentation for any purpose and without fee is hereby granted, provided that the above copyright notice appear in all copies. The authors and McGill University make no representations about the suitability of this software for any purpose. It is provided "as is" without express or implied warranty. (Fonov et al., NeuroImage 2011; 2009) |
| abdominal MR "abdomen^liver marked lesion" with an overlay contour; CT_small (CT, spine); `J2K_pixelrep_mismatch.dcm` and `693_J2KI.dcm` (two axial head CT slices, JPEG 2000); MR_small; JPEG2000 (whole-body NM bone scan) | pydicom `data/test_files/` | pydicom: MIT. Test files: de-identified, downsized samples that the pydicom project distributes believing them free of restrictions (NEMA WG04 and other public sources; see pydicom's `data/test_files/README.txt`) |
| retina fundus photograph; cell (quantitative phase image) | scikit-image `skimage/data/` | CC0 (per scikit-image's data README); code BSD-3-Clause |
| immunohistochemistry (colon, DAB FHL2 + haematoxylin) | scikit-image `skimage/data/` | BSD-3-Clause terms of scikit-image (data README: "Immunohistochemical (IHC) staining with hematoxylin counterstaining ... colonic glands", courtesy of the scikit-image contributors) |
| `img2d.tif` + `mask2d.tif` fluorescence nuclei; `histo.jpg` H&E | stardist 0.9.2 wheel `stardist/data/images/` | stardist: BSD-3-Clause. Nuclei image and labels from the 2018 Data Science Bowl (stage 1 training set, BBBC038, CC0); H&E image from The Cancer Imaging Archive (TCIA), as stated by stardist |

## How the masks were made

Masks are binary PNGs (0/255) at image size. "shipped" masks come with the data; "DERIVED" masks were
computed here by the classic method shown (no learning, no manual editing); "SYNTHETIC" records contain a
lesion painted into a real image (`synthetic: true` in index.json). Images are resized with Lanczos, masks
with bilinear interpolation of 0/255 followed by >= 128. Masks under {min_px} px after resizing are dropped.
Region prompts in `regions/` are computed from the written masks: a "point" is a {point}-px square around the
innermost pixel of the mask's largest component, a "box" its bounding box, and a "background" point a square
at least 3 px away from every mask of the image (none when no such place exists).

| source file | mask label | method |
|---|---|---|
"""

PROVENANCE_SPLITS = """
## Splits

`split` in index.json is decided per source slice (`training.sources.assign_splits`): inside each source
image/volume (and plane, for the MNI volume) the source slice or tile positions (`split_unit`) are sorted,
a contiguous block of ~15% starting at 30% of the range goes to `val`, one starting at 65% to `test`, and
the rest to `train`. Sources with fewer than 3 slices/tiles (pydicom's MR_small, CT_small and the liver MR)
are train-only. The other single-image sources are cut into tiles with a guard band of {guard} px between
neighbours (`training.sources.guarded_tiles`), and their tiles are the split units: the two head CT slices
(2x2 tiles each), the fundus photograph (3x3 tiles of its {retina}-px copy) and the phase image of one cell
(2x2 tiles of a window centred on the cell, so each tile holds a quarter of it). Their val and test scores
therefore come from other parts of the same image, never the same pixels: a weak test of generalisation, but
every bundled modality is scored. No source slice or tile is in two splits; synthetic-lesion records share the
split of the slice they were painted into. Caveat: the MNI152 template is ONE brain, so its val/test
slices are different slices of the same subject, and orthogonal planes intersect; treat MNI scores as a
sanity check, not a generalisation measure. The tiles of one stardist/IHC/NM image are disjoint in pixels.

## Counts
"""


def provenance_markdown(records: list[dict]) -> str:
    """PROVENANCE.md text for the written records: sources, licences, mask methods, split rule, counts."""
    text = PROVENANCE_HEADER.format(max_side=MAX_SIDE, stardist=STARDIST_REQUIREMENT, min_px=MIN_MASK_PIXELS,
                                  point=2 * POINT_HALF_PX + 1)
    methods = sorted({(r["source"]["package"] + " " + r["source"]["file"], m["label"], m["method"])
                      for r in records for m in r["masks"]})
    text += "".join(f"| {src} | {label} | {method} |\n" for src, label, method in methods)
    text += PROVENANCE_SPLITS.format(guard=TILE_GUARD_PX, retina=RETINA_WORK_SIDE)
    text += "\n| modality | " + " | ".join(SPLITS) + " | masks |\n|---|---|---|---|---|\n"
    for modality in sorted({r["modality"] for r in records}):
        rows = [r for r in records if r["modality"] == modality]
        per_split = [str(sum(r["split"] == s for r in rows)) for s in SPLITS]
        text += f"| {modality} | " + " | ".join(per_split) + f" | {sum(len(r['masks']) for r in rows)} |\n"
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="asset folder to (re)write")
    parser.add_argument("--stardist-wheel", type=Path, default=None,
                        help=f"a downloaded {STARDIST_REQUIREMENT} wheel (default: pip download it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.stardist_wheel or download_stardist_wheel(Path(tmp))
        records = write_assets(extract_all(wheel), args.out)
    log.info("wrote %d images with %d masks to %s", len(records), sum(len(r["masks"]) for r in records),
             args.out)


if __name__ == "__main__":
    main()
