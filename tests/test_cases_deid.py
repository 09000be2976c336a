"""De-identification: pydicom's bundled DICOM files plus a synthetic file with every Annex E attribute."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cases.deid import (
    DEID_METHOD,
    UidMap,
    annex_e_leftovers,
    deidentify,
    deidentify_bytes,
    resolve_action,
    strip_image_metadata,
)
from cases.deid_table import BASIC_PROFILE, FILE_META_ACTIONS
from cases.errors import InvalidCaseData
from cases.samples import PHI, full_phi_dataset

BUNDLED = ("CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "liver_1frame.dcm", "JPEG2000.dcm")


def _all_values(ds: Dataset) -> list[str]:
    values: list[str] = []
    ds.walk(lambda _d, elem: values.append(str(elem.value)) if elem.VR not in ("SQ", "OB", "OW") else None)
    return values


def test_table_keywords_match_the_dicom_dictionary() -> None:
    assert len(BASIC_PROFILE) >= 200
    for tag, keyword, action in BASIC_PROFILE:
        assert keyword_for_tag(tag) == keyword
        assert resolve_action(action) in {"X", "Z", "D", "U", "K", "C"}


def test_every_annex_e_value_is_gone_after_deidentification() -> None:
    original = full_phi_dataset()
    uids = UidMap()
    clean, report = deidentify(original, uids)
    leftover = [v for v in _all_values(clean) if "PHI" in v or PHI in v or "STATION" in v or "SECRET" in v]
    assert leftover == []
    originals = {str(original[t].value) for t, _k, _a in BASIC_PROFILE if dictionary_VR(t) == "UI"}
    assert not originals & set(_all_values(clean))
    assert not any(e.tag.is_private for e in clean) and report.private_removed == 1
    assert not any(e.tag.group in (0x5000, 0x6000) for e in clean)
    assert clean.PatientIdentityRemoved == "YES" and clean.DeidentificationMethod == DEID_METHOD
    assert clean.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
    assert not report.needs_review  # BurnedInAnnotation NO
    assert original.PatientName == f"{PHI}{[k for _t, k, _a in BASIC_PROFILE].index('PatientName')}"


def test_uid_remap_is_consistent_across_files_of_one_study() -> None:
    a, b = full_phi_dataset(), full_phi_dataset()
    uids = UidMap()
    clean_a, _ = deidentify(a, uids)
    clean_b, _ = deidentify(b, uids)
    assert clean_a.StudyInstanceUID == clean_b.StudyInstanceUID != a.StudyInstanceUID
    assert clean_a.StudyInstanceUID.startswith("2.25.") or len(clean_a.StudyInstanceUID) <= 64


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_pydicom_files_are_deidentified(name: str) -> None:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom does not bundle {name}")
    original = dcmread(path)
    data, report = deidentify_bytes(open(path, "rb").read())  # noqa: SIM115
    clean = dcmread(io.BytesIO(data))
    assert data[:128] == b"\x00" * 128  # preamble zeroed
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "InstitutionName",
        "ReferringPhysicianName",
    ):
        if keyword in original and str(original[keyword].value):
            assert str(clean.get(keyword, "")) in ("", "ANONYMOUS", "ANONYMIZED")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if keyword in original:
            assert clean[keyword].value != original[keyword].value
    assert not any(e.tag.is_private for e in clean.iterall())
    assert not any(e.tag.group >> 8 in (0x50, 0x60) for e in clean)
    assert clean.PatientIdentityRemoved == "YES"
    assert report.needs_review and clean.BurnedInAnnotation == "YES"  # none says NO: all need review
    np.testing.assert_array_equal(clean.pixel_array, original.pixel_array)  # pixels untouched


def test_overlay_file_loses_its_overlay() -> None:
    original = dcmread(get_testdata_file("examples_overlay.dcm", download=False))
    assert any(e.tag.group == 0x6000 for e in original)
    clean, report = deidentify(original)
    assert report.curves_overlays_removed > 0 and not any(e.tag.group == 0x6000 for e in clean)


def test_non_dicom_bytes_are_refused() -> None:
    with pytest.raises(InvalidCaseData, match="not a DICOM"):
        deidentify_bytes(b"hello, I am not DICOM" * 10)


def test_png_text_chunks_and_jpeg_exif_are_stripped() -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text("PatientName", PHI)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG", pnginfo=info)
    exif = Image.Exif()
    exif[0x010E] = f"ImageDescription {PHI}"
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", exif=exif.tobytes())
    for data, kind in ((png.getvalue(), "PatientName"), (jpeg.getvalue(), "exif")):
        assert PHI.encode() in data
        stripped = strip_image_metadata(data)
        assert kind in stripped.dropped_metadata
        assert PHI.encode() not in stripped.png
        with Image.open(io.BytesIO(stripped.png)) as again:
            assert dict(again.info) == {} or set(again.info) <= {"dpi"}
            assert not again.getexif()
    np.testing.assert_array_equal(strip_image_metadata(png.getvalue()).rgb, pixels)


def test_random_uids_are_valid() -> None:
    assert len(generate_uid()) <= 64


def test_every_table_action_is_applied_to_every_attribute() -> None:
    """Issue 17: check each Table E.1-1 row's action (X removed, Z empty, D dummy, U new UID), file meta too.

    Bug: ConsultingPhysicianName, InstanceCreationDate, DetectorID, DerivationDescription, TextValue,
    EvaluatorName and the file-meta PrivateInformation (0002,0102) survived de-identification.
    """
    original = full_phi_dataset()
    original.file_meta.PrivateInformationCreatorUID = "1.2.826.0.1.3680043.2.1143.77"
    original.file_meta.PrivateInformation = b"SECRETMETA"
    original.file_meta.SourceApplicationEntityTitle = "STATIONX"
    uids = UidMap()
    clean, _report = deidentify(original, uids)
    wrong = []
    for tag, keyword, action in BASIC_PROFILE:
        done = resolve_action(action)
        elem = clean.get(tag)
        before = original[tag].value
        if done == "X":
            ok = elem is None
        elif done == "Z":
            ok = (
                elem is not None
                and elem.value in (None, "", b"", [])
                or (elem is not None and elem.VR == "SQ" and len(elem.value) == 0)
            )
        elif done == "D":
            ok = elem is not None and str(elem.value) != str(before)
        elif done == "U":
            ok = elem is not None and (elem.VR == "SQ" or elem.value == uids(str(before)) != before)
        else:
            ok = True
        if not ok:
            wrong.append(f"{keyword}:{action}")
    assert wrong == []
    for tag, keyword, action in FILE_META_ACTIONS:
        if action == "X":
            assert tag not in clean.file_meta, keyword
    assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
    named = {"ConsultingPhysicianName", "InstanceCreationDate", "DetectorID", "DerivationDescription",
             "TextValue", "EvaluatorName"}  # fmt: skip
    assert named <= {k for _t, k, _a in BASIC_PROFILE}


def test_no_annex_e_value_is_left_after_a_file_round_trip() -> None:
    """Stored/exported bytes: count Table E.1-1 values still present after deidentify_bytes (target 0)."""
    original = full_phi_dataset()
    original.file_meta.PrivateInformationCreatorUID = "1.2.826.0.1.3680043.2.1143.77"
    original.file_meta.PrivateInformation = b"SECRETMETA"
    for tag in [elem.tag for elem in original if elem.tag.group == 0]:  # command set: not allowed in files
        del original[tag]
    buffer = io.BytesIO()
    original.preamble = b"\0" * 128
    original.save_as(buffer, enforce_file_format=True)
    clean_bytes, _ = deidentify_bytes(buffer.getvalue())
    clean = dcmread(io.BytesIO(clean_bytes))
    assert annex_e_leftovers(original, clean) == []
    assert b"SECRETMETA" not in clean_bytes
