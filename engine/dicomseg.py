"""Masks out as DICOM SEG (highdicom), referencing the image they were drawn on.

- DICOM input: the SEG references the source SOP instance(s) and lies on their grid (same rows, columns
  and frames), so PACS viewers and 3D Slicer overlay it on the original series.
- PNG / JPEG / NIfTI input: there is no DICOM instance to point at, so a Secondary Capture of the image
  that was shown (the (H, W, 3) RGB the model saw) is written too, and the SEG references it.

No torch here: the portal and the CLI both call these functions with numpy masks.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MANUFACTURER = "MedPLIB Portal"
SOFTWARE_VERSION = "medplib-portal 1"
SEG_SERIES_NUMBER = 900
SC_SERIES_NUMBER = 901
SC_SUFFIX = "-source-sc.dcm"  # the Secondary Capture written beside a SEG of a non-DICOM image


class SegExportError(ValueError):
    """The mask cannot be written as DICOM SEG (wrong size, unusable source); the message says why."""


@dataclass(frozen=True)
class SegFiles:
    """What was written: the SEG and, for non-DICOM input, the Secondary Capture it references."""

    seg: Path
    secondary_capture: Path | None
    referenced_sop_instance_uids: tuple[str, ...]


def _segment_description(label: str, model_name: str):  # -> hd.seg.SegmentDescription
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="MedPLIB", version=model_name[:64] or "unknown", family=codes.cid7162.ArtificialIntelligence
    )
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=(label or "segment")[:64],
        segmented_property_category=codes.cid7150.Tissue,
        segmented_property_type=codes.cid7150.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )


def build_seg(sources: Sequence, mask: np.ndarray, label: str, model_name: str = ""):  # -> hd.seg.Segmentation
    """A binary SEG of `mask` over `sources` (pydicom Datasets).

    mask: (H, W) bool for one single-frame source, or (F, H, W) bool: one plane per source instance (a
    series) or per frame of one multi-frame source. H, W must equal the sources' Rows, Columns.
    """
    import highdicom as hd

    stack = np.asarray(mask, dtype=bool)
    stack = stack[None] if stack.ndim == 2 else stack
    first = sources[0]
    if stack.shape[1:] != (int(first.Rows), int(first.Columns)):
        raise SegExportError(
            f"the mask is {stack.shape[2]}x{stack.shape[1]} but the DICOM image is {first.Columns}x{first.Rows}; "
            "masks must be on the source grid"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # highdicom's person-name style hints
        try:
            return hd.seg.Segmentation(
                source_images=list(sources), pixel_array=stack.astype(np.uint8),
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[_segment_description(label, model_name)],
                series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(),
                instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=model_name[:64] or "MedPLIB",
                software_versions=SOFTWARE_VERSION, device_serial_number="none", omit_empty_frames=False,
            )  # fmt: skip
        except (ValueError, AttributeError, TypeError) as err:
            raise SegExportError(f"cannot build a DICOM SEG on this source ({err})") from err


def secondary_capture(rgb: np.ndarray, spacing_mm: tuple[float, float] | None = None, name: str = ""):
    """A DICOM Secondary Capture of the displayed (H, W, 3) uint8 RGB image, anonymous patient."""
    import highdicom as hd

    image = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    if image.ndim != 3 or image.shape[2] != 3:
        raise SegExportError(f"the displayed image must be (H, W, 3) RGB, got {image.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sc = hd.sc.SCImage(
            pixel_array=image, photometric_interpretation=hd.PhotometricInterpretationValues.RGB, bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT, study_instance_uid=hd.UID(),
            series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(), series_number=SC_SERIES_NUMBER,
            instance_number=1, manufacturer=MANUFACTURER, patient_orientation=("L", "P"),
            patient_name="Anonymous^", patient_id="none", pixel_spacing=spacing_mm,
            series_description=f"Displayed image {name}"[:64],
        )  # fmt: skip
    return sc


def read_sources(path: str | Path) -> list:
    """The DICOM instance(s) of a file or a series folder, sorted along the slice axis (pydicom Datasets)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    datasets = []
    for file in files:
        try:
            datasets.append(pydicom.dcmread(file))
        except (InvalidDicomError, OSError) as err:
            if not path.is_dir():
                raise SegExportError(f"{file.name} is not a readable DICOM file ({err})") from err
    if not datasets:
        raise SegExportError(f"no DICOM file in {path}")
    return sort_series(datasets)


def sort_series(datasets: list) -> list:
    """Instances of one series in slice order: position along the slice normal, else InstanceNumber."""

    def position(ds) -> float:
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
            return float(np.dot(np.cross(row, col), np.asarray(ds.ImagePositionPatient, float)))
        return float(ds.get("InstanceNumber", 0) or 0)

    return sorted(datasets, key=position)


def write_seg_for_dicom(
    source_path: str | Path, mask: np.ndarray, out: str | Path, *, label: str, frame: int = 0, model_name: str = ""
) -> SegFiles:
    """SEG of a 2-D mask drawn on frame `frame` of a DICOM file (multi-frame: the other frames are empty)."""
    sources = read_sources(source_path)
    source = sources[0]
    n_frames = int(source.get("NumberOfFrames", 1) or 1)
    plane = np.asarray(mask, bool)
    if n_frames > 1:
        stack = np.zeros((n_frames, *plane.shape), bool)
        stack[frame] = plane
        plane = stack
    seg = build_seg([source], plane, label, model_name)
    out = Path(out)
    seg.save_as(out)
    return SegFiles(out, None, (str(source.SOPInstanceUID),))


def write_seg_for_display(
    rgb: np.ndarray, mask: np.ndarray, out: str | Path, *, label: str,
    spacing_mm: tuple[float, float] | None = None, model_name: str = "",
) -> SegFiles:  # fmt: skip
    """SEG of a mask on a non-DICOM image: writes `<out stem>-source-sc.dcm` and a SEG that references it."""
    sc = secondary_capture(rgb, spacing_mm)
    seg = build_seg([sc], np.asarray(mask, bool), label, model_name)
    out = Path(out)
    sc_path = out.with_name(out.name.removesuffix(".dcm") + SC_SUFFIX)
    sc.save_as(sc_path)
    seg.save_as(out)
    return SegFiles(out, sc_path, (str(sc.SOPInstanceUID),))


def read_seg_mask(path: str | Path) -> np.ndarray:
    """(F, H, W) bool planes of segment 1 of a SEG file, in the order of its referenced source frames."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    uids = [uid for _study, _series, uid in seg.get_source_image_uids()]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    return pixels[..., 0] > 0
