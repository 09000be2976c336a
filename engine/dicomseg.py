"""Masks out as DICOM SEG (highdicom), referencing the image they were drawn on.

- DICOM input: the SEG references the source SOP instance(s) and lies on their grid (same rows, columns
  and frames), so PACS viewers and 3D Slicer overlay it on the original series.
- PNG / JPEG / NIfTI input: there is no DICOM instance to point at, so a Secondary Capture of the image
  that was shown (the (H, W, 3) RGB the model saw) is written too, and the SEG references it.
- A NIfTI volume: one Secondary Capture per segmented slice (a series in `<out stem>-source-sc/`) and one
  multi-frame SEG, frame k on instance k. The SC IOD has no Image Plane module, so each SC carries the
  slice's position, orientation and spacing (from the NIfTI affine) as standard-extended attributes with a
  shared Frame of Reference; viewers that ignore them still get PatientOrientation and PixelSpacing.

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
SC_SERIES_SUFFIX = "-source-sc"  # the folder of a volume's Secondary Capture series beside its SEG
ORIENTATION_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x / +y, -y / +z, -z in DICOM LPS
ORTHOGONAL_TOLERANCE = 1e-4  # |row . column| above this: a sheared affine, which DICOM images cannot carry


class SegExportError(ValueError):
    """The mask cannot be written as DICOM SEG (wrong size, unusable source); the message says why."""


@dataclass(frozen=True)
class SegFiles:
    """What was written: the SEG and, for non-DICOM input, the Secondary Capture it references."""

    seg: Path
    secondary_capture: Path | None  # one SC file, or the folder of a volume's SC series
    referenced_sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class SliceGeometry:
    """Where a displayed slice lies, in DICOM patient coordinates (LPS, mm): its Image Plane attributes.

    position: centre of the first (top-left) pixel; row_cosine: direction of increasing column;
    column_cosine: direction of increasing row; spacing_mm: (between rows, between columns);
    thickness_mm: distance between neighbouring slices.
    """

    position: tuple[float, float, float]
    row_cosine: tuple[float, float, float]
    column_cosine: tuple[float, float, float]
    spacing_mm: tuple[float, float]
    thickness_mm: float

    @property
    def patient_orientation(self) -> tuple[str, str]:
        """PatientOrientation letters of the row and column directions, main axis first ('L', 'P'; 'LP' if oblique)."""
        return orientation_letters(self.row_cosine), orientation_letters(self.column_cosine)


def orientation_letters(cosine: Sequence[float], minor: float = 0.1) -> str:
    """DICOM LPS direction → PatientOrientation letters, largest component first (components under `minor` left out)."""
    order = sorted(range(3), key=lambda axis: -abs(cosine[axis]))
    letters = [ORIENTATION_LETTERS[a][0 if cosine[a] > 0 else 1] for a in order if abs(cosine[a]) >= minor]
    return "".join(letters) or "L"


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


def secondary_capture(rgb: np.ndarray, spacing_mm: tuple[float, float] | None = None, name: str = "", *,
                      orientation: tuple[str, str] = ("L", "P")):  # fmt: skip
    """A DICOM Secondary Capture of the displayed (H, W, 3) uint8 RGB image, anonymous patient.

    orientation: PatientOrientation (row direction, column direction); ("L", "P") is an axial display.
    """
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
            instance_number=1, manufacturer=MANUFACTURER, patient_orientation=orientation,
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


def secondary_capture_series(rgbs: Sequence[np.ndarray], geometry: Sequence[SliceGeometry], *,
                             name: str = "") -> list:  # fmt: skip
    """One Secondary Capture per (H, W, 3) uint8 slice, one study and series, InstanceNumber 1..N.

    geometry: one SliceGeometry per slice: the Image Plane attributes and a shared Frame of Reference (a SEG
    of more than one frame needs them to tell the frames apart).
    """
    import highdicom as hd

    if len(geometry) != len(rgbs):
        raise SegExportError(f"need one slice geometry per slice: {len(rgbs)} slices, {len(geometry)} geometries")
    study, series, frame_of_reference = hd.UID(), hd.UID(), hd.UID()
    instances = []
    for index, (rgb, where) in enumerate(zip(rgbs, geometry, strict=True)):
        sc = secondary_capture(rgb, where.spacing_mm, name, orientation=where.patient_orientation)
        sc.StudyInstanceUID, sc.SeriesInstanceUID, sc.InstanceNumber = study, series, index + 1
        _place(sc, where, frame_of_reference)
        instances.append(sc)
    return instances


def _place(sc, where: SliceGeometry, frame_of_reference: str) -> None:
    """Image Plane and Frame of Reference attributes on an SC (a standard extended SOP instance)."""
    sc.FrameOfReferenceUID = frame_of_reference
    sc.PositionReferenceIndicator = ""
    sc.ImagePositionPatient = [round(float(v), 4) + 0.0 for v in where.position]  # + 0.0: no "-0.0" in the file
    sc.ImageOrientationPatient = [round(float(v), 6) + 0.0 for v in (*where.row_cosine, *where.column_cosine)]
    sc.PixelSpacing = [round(float(v), 6) for v in where.spacing_mm]
    sc.SliceThickness = round(float(where.thickness_mm), 6)


def series_folder(out: str | Path) -> Path:
    """The folder of the SC series written beside the SEG `out` (`brain.dcm` → `brain-source-sc/`)."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".dcm") + SC_SERIES_SUFFIX)


def write_seg_for_display_series(
    rgbs: Sequence[np.ndarray], masks: np.ndarray, out: str | Path, *, label: str,
    geometry: Sequence[SliceGeometry], model_name: str = "", name: str = "",
) -> SegFiles:  # fmt: skip
    """A multi-frame SEG over a Secondary Capture series of the displayed slices (a NIfTI volume).

    rgbs: N (H, W, 3) uint8 slices as displayed; masks: (N, H, W) bool, plane k drawn on slice k. Writes
    `<out stem>-source-sc/NNNN.dcm` (InstanceNumber order) and the SEG at `out`, frame k → instance k.
    """
    stack = np.asarray(masks, bool)
    if stack.ndim != 3 or stack.shape[0] != len(rgbs):
        raise SegExportError(f"need one mask plane per slice: {len(rgbs)} slices, masks {stack.shape}")
    instances = secondary_capture_series(rgbs, geometry, name=name)
    folder = series_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    for sc in instances:
        sc.save_as(folder / f"{int(sc.InstanceNumber):04d}.dcm")
    seg = build_seg(instances, stack, label, model_name)
    out = Path(out)
    seg.save_as(out)
    return SegFiles(out, folder, tuple(str(sc.SOPInstanceUID) for sc in instances))


def read_seg_mask(path: str | Path) -> np.ndarray:
    """(F, H, W) bool planes of segment 1 of a SEG file, in the order of its referenced source frames."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    uids = [uid for _study, _series, uid in seg.get_source_image_uids()]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    return pixels[..., 0] > 0
