"""The rough edges listed in issue 21, each pinned by a test (their browser side: tests/browser/test_browser_edges.py)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from portal_helpers import load_test_engine, portal_context, write_png
from pydicom.data import get_testdata_file

from cases import CaseStore
from cases.samples import sample_draft
from portal import ask_session as steps
from portal import texts
from portal.ask_tab import AskHandlers

LOOK = (0.5, "fill + outline", "orange")
SESSION, INFO, POSITION = 0, 1, 2


@pytest.fixture(scope="module")
def handlers():
    return AskHandlers(portal_context(load_test_engine()))


def test_a_4d_nifti_says_only_its_first_volume_is_shown(handlers, tmp_path: Path) -> None:
    """Bug: nothing said that a 4-D NIfTI is shown as its first volume only."""
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((24, 24, 4, 3)).astype(np.float32), np.eye(4)), path)
    assert "first of its 3 volumes" in handlers.load(str(path), False)[INFO]
    three_d = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((24, 24, 4), np.float32), np.eye(4)), three_d)
    assert "volumes" not in handlers.load(str(three_d), False)[INFO]


def test_the_slider_says_slice_for_nifti_and_frame_for_dicom(handlers, tmp_path: Path) -> None:
    """Bug: the slider said "Frame" for NIfTI slices."""
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((24, 24, 6), np.float32), np.eye(4)), path)
    assert handlers.load(str(path), False)[POSITION]["label"] == texts.SLICE_LABEL
    frames = handlers.load(get_testdata_file("SC_rgb_rle_2frame.dcm"), False)[POSITION]
    assert frames["label"] == texts.FRAME_LABEL and frames["visible"]


def test_the_slider_reacts_to_typed_numbers_and_arrow_keys(handlers) -> None:
    """Bug: typing a frame number + Enter, or the arrow keys, moved the slider but not the image.

    Gradio sends both as the slider's `input` event (release is mouse-only): the view must listen to it.
    """
    from portal.ask_tab import build_ask_tab

    with gr.Blocks() as demo:
        build_ask_tab(portal_context(handlers.ctx.engine))
    sliders = [b._id for b in demo.blocks.values() if isinstance(b, gr.Slider) and b.label == texts.FRAME_LABEL]
    triggers = {(t[0], t[1]) for d in demo.config["dependencies"] for t in d["targets"]}
    assert (sliders[0], "input") in triggers


def test_counts_have_the_right_noun() -> None:
    """Bug: "Mask area: 1 pixels" and "1 cases"."""
    assert texts.count_noun(1, "pixel") == "1 pixel" and texts.count_noun(1024, "case") == "1,024 cases"
    assert texts.MASK_AREA.format(area=texts.count_noun(1, "pixel")) == "Mask area: **1 pixel**"


def test_cli_list_says_1_case(tmp_path: Path, capsys) -> None:
    """Bug: `python -m cases list` printed "1 cases"."""
    from cases.cli import main

    db = str(tmp_path / "one.sqlite")
    store = CaseStore(db, seed_starter=False)
    store.create_case(store.operator_session(), sample_draft())
    assert main(["--db", db, "list"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("\n1 case")


def test_mask_only_answers_keep_their_mask_size_after_a_new_turn(handlers) -> None:
    """Bug: earlier mask-only answers turned into "(no text)" after a new turn, and their mask size was lost."""
    session = handlers.load(get_testdata_file("CT_small.dcm"), False)[SESSION]
    out = list(handlers.segment(session, "Please segment the bone in this image.", "None", None, *LOOK))[-1]
    session = out[SESSION]
    first_area = session.answer.mask_area
    assert session.history[0][1].strip() == "", "the tiny model answers a forced <SEG> with the mask only"
    chat = list(handlers.ask(session, "Describe the image.", "None", None, *LOOK))[-1][1]
    assert chat[1]["content"] == texts.CHAT_MASK_ONLY.format(pixels=first_area)
    assert texts.CHAT_NO_TEXT not in chat[1]["content"]


def test_segment_without_an_image_asks_for_an_image(handlers) -> None:
    """Bug: Segment with no image said "Type a question first"."""
    with pytest.raises(gr.Error, match="Upload an image first"):
        list(handlers.segment(steps.AskSession(), "", "None", None, *LOOK))


@pytest.mark.parametrize(("size", "needle"), [((1, 1), "at least 16"), ((200, 5000), "mostly padding")])
def test_unusable_image_sizes_are_refused(handlers, tmp_path: Path, size: tuple[int, int], needle: str) -> None:
    """Bug: a 1×1 or 5000×200 image was accepted with an unusable preview."""
    path = write_png(tmp_path / "odd.png", *size)
    with pytest.raises(gr.Error, match=needle):
        handlers.load(str(path), False)


def test_transparent_pixels_are_black_and_said_so(handlers, tmp_path: Path) -> None:
    """Bug: an RGBA image silently showed the hidden colour of its transparent pixels."""
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = 200  # bright everywhere ...
    rgba[:, 20:, 3] = 255  # ... but only the right half is visible
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    session = handlers.load(str(path), False)[SESSION]
    assert session.rgb[:, :20].max() == 0 and session.rgb[:, 20:].min() == 200
    assert "Transparent pixels (50%" in steps.describe(session)


def test_logged_out_visitors_do_not_see_the_instructor_editor(tmp_path: Path) -> None:
    """Bug: logged-out visitors saw the whole instructor editor, including Delete and Publish."""
    from portal.context import PortalSettings
    from portal.instructor_tab import build_instructor_tab

    class Ctx:
        store = CaseStore(str(tmp_path / "i.sqlite"), seed_starter=False)
        settings = PortalSettings()

    with gr.Blocks() as demo:
        build_instructor_tab(Ctx)
    area = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "instructor-editor")
    assert area.visible is False
    inside = {c.value for c in _descendants(area) if isinstance(c, gr.Button)}
    assert {"Delete", "Publish", "Save as new case"} <= inside


def _descendants(block) -> list:
    out = []
    for child in getattr(block, "children", []):
        out += [child, *_descendants(child)]
    return out


def test_the_library_card_shows_the_model_answers(tmp_path: Path) -> None:
    """Bug: the library card did not show the model's answers."""
    from portal.library_tab import LibraryHandlers

    store = CaseStore(str(tmp_path / "l.sqlite"), seed_starter=False)
    op = store.operator_session()
    case = store.create_case(op, sample_draft(size=(30, 40)))
    mask = np.zeros((30, 40), bool)
    mask[10:12, 10:11] = True
    store.save_model_output(op, case.questions[1].id, model_id="medplib-tiny", revision=None, parameters={},
                            answer="", mask=mask)  # fmt: skip
    store.save_model_output(op, case.questions[0].id, model_id="medplib-tiny", revision=None, parameters={},
                            answer="Yes, a lesion.", mask=None)  # fmt: skip
    card = LibraryHandlers(store).open_case(case.id, "as stored")[2]
    assert "**Model answers** (medplib-tiny)" in card and "Yes, a lesion." in card
    assert "(a mask only) · mask 2 pixels" in card
