"""De-identification of uploads before anything is stored.

DICOM: the PS3.15 Annex E Basic Application Level Confidentiality Profile (table in
`cases.deid_table`), applied recursively inside sequences; all private tags, curves (50xx) and
overlays (60xx) removed; UIDs remapped consistently through a `UidMap`; the preamble zeroed;
PatientIdentityRemoved=YES and DeidentificationMethod(+CodeSequence) set. Pixel data is not changed,
so any file whose BurnedInAnnotation is not "NO" is flagged for curator review (and marked YES).

PNG/JPEG: metadata (EXIF, text chunks, ICC, XMP) is dropped by decoding the pixels and re-encoding
a fresh PNG.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from cases.deid_table import BASIC_PROFILE, FILE_META_ACTIONS
from cases.errors import UNTRUSTED_INPUT_ERRORS, InvalidCaseData
from cases.imaging import MAX_UPLOAD_BYTES, decode_rgb, encode_png

ACTIONS: dict[int, str] = {tag: action for tag, _keyword, action in BASIC_PROFILE}
# Compound actions keep the attribute present where the standard allows it (so type 1/2 stay valid).
COMPOUND = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}
DEID_METHOD = "PS3.15 Annex E Basic Profile (MedPLIB portal)"  # LO: at most 64 characters
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
DUMMY_TEXT = "ANONYMIZED"
DUMMY_BY_VR = {
    "PN": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y",
    "CS": "ANONYMIZED", "SH": DUMMY_TEXT, "LO": DUMMY_TEXT, "ST": DUMMY_TEXT, "LT": DUMMY_TEXT,
    "UT": DUMMY_TEXT, "UC": DUMMY_TEXT, "AE": "ANONYMOUS", "DS": "0", "IS": "0", "US": 0, "SS": 0, "UL": 0,
    "SL": 0, "FL": 0.0, "FD": 0.0, "UV": 0, "SV": 0,
}  # fmt: skip
CURVE_GROUPS = range(0x5000, 0x5100)
OVERLAY_GROUPS = range(0x6000, 0x6100)


def resolve_action(action: str) -> str:
    """'X', 'Z', 'D', 'U', 'K' or 'C' for a table action (compound actions resolved by COMPOUND)."""
    return COMPOUND.get(action, action)


class UidMap:
    """Consistent UID replacement: the same original UID always maps to the same new UID."""

    def __init__(self) -> None:
        self._map: dict[str, str] = {}

    def __call__(self, uid: str) -> str:
        if uid not in self._map:
            self._map[uid] = generate_uid()
        return self._map[uid]

    @property
    def originals(self) -> frozenset[str]:
        return frozenset(self._map)


@dataclass(frozen=True)
class DeidReport:
    """What de-identification did, and whether a curator must check the pixels."""

    removed: int
    emptied: int
    dummied: int
    uids_remapped: int
    private_removed: int
    curves_overlays_removed: int
    needs_review: bool
    review_reason: str | None = None
    actions: tuple[str, ...] = field(default=(), repr=False)  # "KEYWORD:ACTION" per touched attribute


def deidentify(ds: Dataset, uid_map: UidMap | None = None) -> tuple[Dataset, DeidReport]:
    """De-identify a copy of `ds`; the input is not modified. Returns (clean dataset, report)."""
    clean = copy.deepcopy(ds)
    uid_map = uid_map or UidMap()
    counts = {"X": 0, "Z": 0, "D": 0, "U": 0}
    touched: list[str] = []
    private = _count_private(clean)
    clean.remove_private_tags()
    groups = _remove_curves_and_overlays(clean)
    _apply_profile(clean, uid_map, counts, touched)
    _fix_file_meta(clean)
    review, reason = _burned_in_review(clean)
    _mark_deidentified(clean)
    report = DeidReport(
        removed=counts["X"], emptied=counts["Z"], dummied=counts["D"], uids_remapped=counts["U"],
        private_removed=private, curves_overlays_removed=groups, needs_review=review, review_reason=reason,
        actions=tuple(touched),
    )  # fmt: skip
    return clean, report


def deidentify_bytes(data: bytes, uid_map: UidMap | None = None) -> tuple[bytes, DeidReport]:
    """DICOM file bytes → de-identified DICOM file bytes (preamble zeroed) and the report."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise InvalidCaseData(f"DICOM file over {MAX_UPLOAD_BYTES // 2**20} MiB; upload a single slice")
    try:
        ds = dcmread(io.BytesIO(data))  # never force=True: non-DICOM input is refused
        clean, report = deidentify(ds, uid_map)
        out = io.BytesIO()
        clean.save_as(out, enforce_file_format=True)
    except InvalidDicomError as error:
        raise InvalidCaseData(f"not a DICOM file: {error}") from None
    except UNTRUSTED_INPUT_ERRORS as error:
        raise InvalidCaseData(f"this DICOM file cannot be read ({type(error).__name__}: {error})") from None
    return out.getvalue(), report


def _count_private(ds: Dataset) -> int:
    count = 0

    def visit(_ds: Dataset, elem: DataElement) -> None:
        nonlocal count
        count += int(elem.tag.is_private)

    ds.walk(visit)
    return count


def _remove_curves_and_overlays(ds: Dataset) -> int:
    removed = 0
    for item in _datasets(ds):
        doomed = [e.tag for e in item if e.tag.group in CURVE_GROUPS or e.tag.group in OVERLAY_GROUPS]
        for tag in doomed:
            del item[tag]
        removed += len(doomed)
    return removed


def _datasets(ds: Dataset) -> list[Dataset]:
    """`ds` and every dataset nested in its sequences, depth first."""
    found = [ds]
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                found.extend(_datasets(item))
    return found


def _apply_profile(ds: Dataset, uid_map: UidMap, counts: dict[str, int], touched: list[str]) -> None:
    for tag in list(ds.keys()):
        elem = ds[tag]
        action = resolve_action(ACTIONS.get(int(tag), "K"))
        if action == "K" and elem.VR == "SQ":
            for item in elem.value:
                _apply_profile(item, uid_map, counts, touched)
            continue
        if action == "K":
            continue
        _apply(ds, elem, action, uid_map, counts, touched)
        counts[action if action in counts else "D"] += 1
        touched.append(f"{elem.keyword or tag}:{action}")


def _apply(
    ds: Dataset, elem: DataElement, action: str, uid_map: UidMap, counts: dict[str, int], touched: list[str]
) -> None:
    if action == "X":
        del ds[elem.tag]
    elif action == "U" and elem.VR == "SQ":  # X/Z/U* on references: de-identify inside every item
        for item in elem.value:
            _apply_profile(item, uid_map, counts, touched)
    elif action == "Z" or (action == "D" and elem.VR == "SQ"):
        elem.value = Sequence([]) if elem.VR == "SQ" else None
    elif action == "U":
        elem.value = [uid_map(str(v)) for v in elem.value] if elem.VM > 1 else uid_map(str(elem.value or ""))
    else:  # D and C: a dummy value of the same VR
        elem.value = DUMMY_BY_VR.get(elem.VR)


def _fix_file_meta(ds: Dataset) -> None:
    """Zero the preamble; drop meta elements that name stations, addresses or private data (the
    FILE_META_ACTIONS X rows, PrivateInformation included); point MediaStorageSOPInstanceUID at the new UID."""
    if isinstance(ds, FileDataset):
        ds.preamble = b"\x00" * 128
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for tag, _keyword, action in FILE_META_ACTIONS:
        if action == "X":
            meta.pop(tag, None)
    for tag in [elem.tag for elem in meta if elem.tag.is_private]:
        del meta[tag]
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _burned_in_review(ds: Dataset) -> tuple[bool, str | None]:
    value = str(ds.get("BurnedInAnnotation", "")).upper()
    if value == "NO":
        return False, None
    reason = "BurnedInAnnotation is YES" if value == "YES" else "BurnedInAnnotation is missing"
    ds.BurnedInAnnotation = "YES"  # unknown is treated as present until a curator checks the pixels
    return True, f"{reason}: check the pixels for burned-in names, dates or IDs before publishing"


def _mark_deidentified(ds: Dataset) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEID_METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = Sequence([code])


@dataclass(frozen=True)
class StrippedImage:
    """A PNG/JPEG re-encoded as a metadata-free PNG: (H, W, 3) uint8 `rgb` and its `png` bytes."""

    rgb: np.ndarray
    png: bytes
    dropped_metadata: tuple[str, ...]


def strip_image_metadata(data: bytes) -> StrippedImage:
    """Decode PNG/JPEG bytes and re-encode the pixels only (EXIF, tEXt/iTXt/zTXt, ICC, XMP dropped)."""
    from cases.imaging import open_checked

    with open_checked(data) as image:
        dropped = tuple(sorted(str(k) for k in image.info))
    rgb = decode_rgb(data)
    return StrippedImage(rgb=rgb, png=encode_png(rgb), dropped_metadata=dropped)


def annex_e_leftovers(original: Dataset, clean: Dataset) -> list[str]:
    """Keywords of Table E.1-1 / file-meta attributes whose original value is still in `clean` (want [])."""
    left = []
    for tag, keyword, action in (*BASIC_PROFILE, *FILE_META_ACTIONS):
        meta = tag >> 16 == 2
        source = getattr(original, "file_meta", Dataset()) if meta else original
        target = getattr(clean, "file_meta", Dataset()) if meta else clean
        if tag not in source or tag not in target or resolve_action(action) == "K":
            continue
        before = source[tag]
        if before.VR != "SQ" and before.value not in (None, "", b"") and target[tag].value == before.value:
            left.append(keyword)
    return left
