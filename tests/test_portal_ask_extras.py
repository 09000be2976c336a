"""Ask-tab extras (issue 21): DICOM SEG download, whole-volume segmentation, save as a case draft."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import nibabel as nib
import numpy as np
import pydicom
import pytest
from portal_helpers import load_test_engine, portal_context, write_png
from pydicom.data import get_testdata_file

from cases import CaseStore
from engine.dicomseg import read_seg_mask
from portal import texts
from portal.ask_extras import AskExtras, read_source
from portal.ask_tab import AskHandlers

LOOK = (0.5, "fill + outline", "orange")


@pytest.fixture(scope="module")
def engine():
    return load_test_engine()


@pytest.fixture
def store(tmp_path: Path) -> CaseStore:
    return CaseStore(str(tmp_path / "x.sqlite"), seed_starter=False)


@pytest.fixture
def parts(engine, store):
    ctx = portal_context(engine)
    ctx = type(ctx)(engine=ctx.engine, store=store, settings=ctx.settings)
    return AskHandlers(ctx), AskExtras(ctx)


def _segmented(handlers: AskHandlers, path: str) -> object:
    session = handlers.load(path, False)[0]
    return list(handlers.segment(session, "Please segment the bone in this image.", "None", None, *LOOK))[-1][0]


class _NoProgress:
    def __call__(self, *args, **kwargs) -> None:
        return None


def test_seg_download_of_a_dicom_references_the_source(parts) -> None:
    handlers, extras = parts
    path = get_testdata_file("CT_small.dcm")
    session = _segmented(handlers, path)
    [seg_path] = extras.seg_download(session, read_source(path))
    seg = pydicom.dcmread(seg_path)
    ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert ref == pydicom.dcmread(path).SOPInstanceUID
    assert np.array_equal(read_seg_mask(seg_path)[0], session.answer.mask)


def test_seg_download_of_a_png_comes_with_its_secondary_capture(parts, tmp_path: Path) -> None:
    handlers, extras = parts
    png = str(write_png(tmp_path / "x.png"))
    session = _segmented(handlers, png)
    seg_path, sc_path = extras.seg_download(session, read_source(png))
    assert pydicom.dcmread(sc_path).Modality == "OT" and np.array_equal(read_seg_mask(seg_path)[0], session.answer.mask)
    with pytest.raises(gr.Error, match="no mask"):
        extras.seg_download(handlers.load(png, False)[0], None)


def test_volume_button_writes_a_mask_on_the_source_grid(parts, tmp_path: Path) -> None:
    handlers, extras = parts
    data = np.zeros((24, 20, 5), np.float32)
    data[6:18, 4:16, 1:4] = 300
    affine = np.diag([-2.0, 1.5, 3.0, 1.0])
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    session = handlers.load(str(path), False)[0]
    outputs = list(extras.segment_volume(session, read_source(str(path)), "Please segment the lesion.", None,
                                         progress=_NoProgress()))  # fmt: skip
    assert len(outputs) == 5 + 1 and "slice 3 of 5" in outputs[2][0]  # one update per slice, then the result
    note, files, cache = outputs[-1]
    assert " mL" in note and "s per slice" in note and "(shape 24×20×5)" in note
    mask = nib.load(files[0])
    assert mask.shape == (24, 20, 5) and np.allclose(mask.affine, affine)
    again = list(extras.segment_volume(session, read_source(str(path)), "Please segment the lesion.", cache,
                                       progress=_NoProgress()))  # fmt: skip
    assert cache.hits == 5 and np.array_equal(np.asarray(nib.load(again[-1][1][0]).dataobj), np.asarray(mask.dataobj))


def test_volume_needs_a_volume(parts, tmp_path: Path) -> None:
    handlers, extras = parts
    session = handlers.load(str(write_png(tmp_path / "p.png")), False)[0]
    with pytest.raises(gr.Error, match="NIfTI volume"):
        list(extras.segment_volume(session, None, "Please segment x.", None, progress=_NoProgress()))


def test_save_as_case_draft_is_for_instructors(parts, store: CaseStore) -> None:
    handlers, extras = parts
    session = _segmented(handlers, get_testdata_file("CT_small.dcm"))
    with pytest.raises(gr.Error, match="instructor action"):
        extras.save_draft(None, session, "From the Ask tab")
    store.create_instructor(store.operator_session(), "teacher", "pw-for-the-test-1")
    login = store.login("teacher", "pw-for-the-test-1")
    note = extras.save_draft(login, session, "From the Ask tab")
    [summary] = store.list_cases(include_unpublished=True)
    case = store.get_case(summary.id, login)
    assert f"#{summary.id}" in note and not summary.published and case.title == "From the Ask tab"
    [question] = case.questions
    assert question.prompt == "Please segment the bone in this image." and question.kind == "segmentation"
    assert np.array_equal(case.images[0].mask("bone").array(), session.answer.mask)
    assert store.model_outputs(question.id)[0].answer == session.answer.text
    assert texts.DRAFT_SAVED.split("**")[0] in note


def test_cancel_stops_between_slices(parts, tmp_path: Path) -> None:
    """Cancel closes the handler's generator (what Gradio does on `cancels=`): no slice after that is computed."""
    handlers, extras = parts
    path = tmp_path / "c.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((24, 24, 8), np.float32), np.eye(4)), str(path))
    session = handlers.load(str(path), False)[0]
    calls = []
    engine = extras.ctx.engine
    original = engine.set_image

    def counting(rgb):
        calls.append(1)
        return original(rgb)

    engine.set_image = counting
    try:
        running = extras.segment_volume(session, read_source(str(path)), "Please segment the x.", None,
                                        progress=_NoProgress())  # fmt: skip
        first = [next(running), next(running)]
        running.close()
    finally:
        engine.set_image = original
    assert "slice 2 of 8" in first[1][0] and len(calls) == 2


def test_volume_button_offers_a_dicom_seg_for_a_nifti_volume(parts, tmp_path: Path) -> None:
    """Issue 21: the whole-volume download had a DICOM SEG for DICOM input only; a NIfTI volume gets one too,
    zipped with the Secondary Capture series it references."""
    import zipfile

    handlers, extras = parts
    data = np.zeros((24, 20, 4), np.float32)
    data[6:18, 4:16, 1:3] = 300
    path = tmp_path / "n.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([-2.0, 1.5, 3.0, 1.0])), str(path))
    session = handlers.load(str(path), False)[0]
    *_, (_note, files, _cache) = extras.segment_volume(session, read_source(str(path)), "Please segment the lesion.",
                                                       None, progress=_NoProgress())  # fmt: skip
    nifti, bundle = files
    assert Path(bundle).name == texts.VOLUME_SEG_ZIP
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(tmp_path / "unzipped")
    seg = pydicom.dcmread(tmp_path / "unzipped" / "volume-seg.dcm")
    series = sorted((tmp_path / "unzipped" / "volume-seg-source-sc").glob("*.dcm"))
    assert len(series) == 4 and len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 4
    planes = read_seg_mask(tmp_path / "unzipped" / "volume-seg.dcm")
    assert int(planes.sum()) == int(np.asarray(nib.load(nifti).dataobj).sum())
