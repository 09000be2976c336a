"""Ask-tab handlers called directly with the real engine (golden tiny checkpoint): every path, bad input too."""

from __future__ import annotations

import json
import zlib
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import gradio as gr
import nibabel as nib
import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image
from portal_helpers import load_test_engine, portal_context, write_png
from pydicom.data import get_testdata_file

from engine import imageio
from engine.results import Answer
from portal import ask_session as steps
from portal import texts
from portal.ask_tab import AskHandlers, render_chat

NIFTI = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
LOOK = (0.5, "fill + outline", "orange")

# indices into the tuple returned by the view handlers (load / change_view)
SESSION, INFO, POSITION, PLANE, WINDOW, PREVIEW, EDITOR, MODEL_INPUT = range(8)
# indices into the tuples yielded by ask / segment
CHAT, OVERLAY, AREA, FILES, PLOT = 1, 3, 4, 5, 6


@pytest.fixture(scope="module")
def engine():
    return load_test_engine()


@pytest.fixture(scope="module")
def handlers(engine):
    return AskHandlers(portal_context(engine))


def _click(x: int, y: int) -> gr.SelectData:
    return gr.SelectData(None, {"index": [x, y], "value": None, "selected": True})


@contextmanager
def refused(match: str):
    """A user mistake: one warning (the toast) with this message, and no exception."""
    with pytest.warns(UserWarning, match=match):
        yield


def _pixels(shown: str) -> np.ndarray:
    """The image behind an image output (the Ask tab returns private PNG files, see exports.shown_png)."""
    return np.asarray(Image.open(shown).convert("RGB"))


def _all_skipped(outputs: tuple) -> None:
    assert all(value == gr.skip() for value in outputs), "a refused request must leave every output unchanged"


def _only(generator) -> None:
    """A refused question yields once: every output (chat, question, overlay, downloads...) unchanged."""
    outputs = list(generator)
    assert len(outputs) == 1
    _all_skipped(outputs[0])


def _final(generator) -> tuple:
    outputs = list(generator)
    assert len(outputs) >= 2, "the answer should stream: a first yield before the last"
    return outputs[-1]


@pytest.fixture(scope="module")
def ct(handlers):
    return handlers.load(get_testdata_file("CT_small.dcm"), False)[SESSION]


# --------------------------------------------------------------------------------------------- loading


def test_ct_upload_shows_soft_tissue_window_and_spacing(handlers):
    out = handlers.load(get_testdata_file("CT_small.dcm"), False)
    assert "CT" in out[INFO] and "0.661" in out[INFO]
    assert out[WINDOW]["value"] == "soft tissue" and out[WINDOW]["visible"]
    assert out[POSITION]["visible"] is False and out[PLANE]["visible"] is False
    assert _pixels(out[PREVIEW]).shape == (128, 128, 3) and _pixels(out[EDITOR]).shape == (128, 128, 3)


def test_window_preset_changes_the_model_image(handlers, ct):
    bone = handlers.change_view(ct, 1, "axial", "bone", False)[SESSION]
    lung = handlers.change_view(ct, 1, "axial", "lung", False)[SESSION]
    assert not np.array_equal(bone.rgb, lung.rgb)
    assert handlers.change_view(ct, 1, "axial", "bone", False)[WINDOW]["value"] == "bone"


def test_multiframe_dicom_gets_a_frame_slider(handlers):
    out = handlers.load(get_testdata_file("examples_ybr_color.dcm"), False)
    assert out[POSITION]["visible"] and out[POSITION]["maximum"] == 30
    assert out[POSITION]["value"] == 16  # the middle frame, as the CLI's default (issue 20)
    assert out[WINDOW]["visible"] is False  # colour: no window
    later = handlers.change_view(out[SESSION], 1, "axial", imageio.AUTO, False)
    assert later[SESSION].index == 0 and "frame 1/30" in later[INFO]
    assert not np.array_equal(_pixels(later[PREVIEW]), _pixels(out[PREVIEW]))


def test_nifti_upload_has_planes_and_slices(handlers):
    out = handlers.load(str(NIFTI), False)
    assert out[PLANE]["visible"] and out[POSITION]["maximum"] == 25 and out[POSITION]["value"] == 13
    coronal = handlers.change_view(out[SESSION], 13, "coronal", imageio.AUTO, False)
    assert coronal[SESSION].rgb.shape == (25, 33, 3) and coronal[POSITION]["maximum"] == 41
    assert "coronal slice 21/41" in coronal[INFO]


def test_model_input_toggle_shows_the_padded_clip_image(handlers, tmp_path):
    out = handlers.load(str(write_png(tmp_path / "wide.png", 90, 180)), True)
    view = _pixels(out[MODEL_INPUT]["value"])
    assert out[MODEL_INPUT]["visible"] and view.shape == (336, 336, 3)
    assert tuple(view[0, 0]) == (122, 116, 104)  # CLIP mean-colour padding above a wide image
    assert handlers.show_model_input(out[SESSION], False)["visible"] is False


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"just some text", "not a supported image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "damaged|not a supported"),
    ],
)
def test_bad_uploads_raise_clear_errors(handlers, tmp_path, content, message):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    with refused(message):
        _all_skipped(handlers.load(str(path), False))


def test_decompression_bomb_upload_is_refused(handlers, tmp_path):
    Image.new("1", (1, 1)).save(tmp_path / "tiny.png")
    data = bytearray((tmp_path / "tiny.png").read_bytes())
    data[16:24] = (20000).to_bytes(4, "big") * 2  # IHDR width/height now claim 20000×20000
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    with refused("too large"):
        _all_skipped(handlers.load(str(tmp_path / "bomb.png"), False))


def test_clearing_the_upload_resets_the_tab(handlers):
    out = handlers.load(None, False)
    assert out[SESSION].image is None and out[PREVIEW] is None


# ---------------------------------------------------------------------------------------------- regions


def test_point_click_marks_the_preview(handlers, ct):
    session, preview, note = handlers.click(ct, "Point", _click(60, 70))
    assert session.marks.active.point == (60, 70) and "point" in note
    assert not np.array_equal(preview, ct.rgb)  # a marker is drawn


def test_click_outside_the_image_is_an_error(handlers, ct):
    with refused("outside"):
        _all_skipped(handlers.click(ct, "Point", _click(500, 10)))


def test_click_without_a_tool_changes_nothing(handlers, ct):
    session, _, note = handlers.click(ct, "None", _click(10, 10))
    assert session is ct and "Point or Box" in note


def test_box_needs_two_clicks_and_undo_works(handlers, ct):
    half, _, note = handlers.click(ct, "Box", _click(20, 30))
    assert half.marks.pending == (20, 30) and "opposite corner" in note
    with refused("one corner"):
        _only(handlers.ask(half, "What is this?", "Box", None, *LOOK))
    box, _, _ = handlers.click(half, "Box", _click(80, 10))
    assert box.marks.active.xyxy == (20, 10, 80, 30)
    undone, _, _ = handlers.undo(box, "Box", None)
    assert undone.marks.active is None
    cleared = handlers.clear(box, "Box")
    assert cleared[0].marks.active is None and np.array_equal(cleared[2], ct.rgb)


def test_region_tool_without_mark_is_an_error(handlers, ct):
    with refused("nothing is marked"):
        _only(handlers.ask(ct, "What is this?", "Point", None, *LOOK))


def test_empty_sketch_is_an_error(handlers, ct):
    empty = {"background": ct.rgb, "layers": [np.zeros((128, 128, 4), np.uint8)], "composite": ct.rgb}
    for value in (None, empty):
        with refused("sketch is empty"):
            _only(handlers.ask(ct, "What is in the marked region?", "Sketch", value, *LOOK))


def test_sketch_region_is_sent_with_the_question(handlers, ct):
    layer = np.zeros((128, 128, 4), np.uint8)
    layer[40:50, 30:90, 3] = 255
    final = _final(handlers.ask(ct, "What is in the marked region?", "Sketch", {"layers": [layer]}, *LOOK))
    session = final[0]
    assert session.last_region == {"kind": "sketch", "pixels": 600}
    assert session.last_question == "What is in the marked region? <region>"


def test_tool_choice_switches_between_click_image_and_sketch(handlers, ct):
    click_image, editor, _note = handlers.choose_tool(ct, "Sketch", None)
    assert click_image["visible"] is False and editor["visible"] is True


def _stroke(rows: slice, cols: slice) -> dict:
    layer = np.zeros((128, 128, 4), np.uint8)
    layer[rows, cols, 3] = 255
    return {"background": None, "layers": [layer], "composite": None}


def test_region_note_names_the_sketch_not_the_earlier_point(handlers, ct):
    """Regression: after a point click, a sketch stroke left the note saying 'point' although the sketch
    is what the model receives."""
    session, _, note = handlers.click(ct, "Point", _click(60, 70))
    assert note == "Active region: point at [60, 70]"
    _, _, note = handlers.choose_tool(session, "Sketch", None)
    assert "draw over the region" in note and "point" not in note.split(".")[0]
    sketch = _stroke(slice(40, 50), slice(30, 90))
    note = handlers.sketched(session, "Sketch", sketch)
    assert note.startswith("Active region: sketch (600 brush pixels)")
    sent = _final(handlers.ask(session, "What is in the marked region?", "Sketch", sketch, *LOOK))[0]
    assert sent.last_region == {"kind": "sketch", "pixels": 600}  # the note told the truth
    _, _, note = handlers.choose_tool(session, "Point", sketch)
    assert note == "Active region: point at [60, 70]"
    _, _, note = handlers.undo(session, "Sketch", sketch)  # Undo takes back clicks, not brush strokes
    assert note.startswith("Active region: sketch (600")


def test_region_note_with_tool_none_says_nothing_is_sent(handlers, ct):
    session, _, _ = handlers.click(ct, "Point", _click(60, 70))
    _, _, note = handlers.choose_tool(session, "None", None)
    assert note.startswith("Region tool None: questions are sent without a region.")
    assert "point at [60, 70] is kept" in note
    sent = _final(handlers.ask(session, "Describe the image.", "None", None, *LOOK))[0]
    assert sent.last_region is None
    _, _, _, note = handlers.clear(session, "Point")
    assert note == texts.NOTE_NO_MARK


# -------------------------------------------------------------------------------------------- questions


@pytest.mark.parametrize("question", ["", "   ", "<region>"])
def test_empty_question_is_an_error(handlers, ct, question):
    with refused("Type a question"):
        _only(handlers.ask(ct, question, "None", None, *LOOK))


def test_region_tag_without_a_region_is_an_error(handlers, ct):
    with refused("no region is marked"):
        _only(handlers.ask(ct, "What is <region>?", "None", None, *LOOK))


def test_too_long_question_is_an_error(handlers, ct):
    with refused("too long"):
        _only(handlers.ask(ct, "x" * 5000, "None", None, *LOOK))


def test_no_image_is_an_error(handlers):
    with refused("Upload an image"):
        _only(handlers.ask(steps.AskSession(), "Describe the image.", "None", None, *LOOK))


def test_ask_streams_and_marks_the_region(handlers, ct):
    session, _, _ = handlers.click(ct, "Point", _click(64, 64))
    outputs = list(handlers.ask(session, "What is in the marked region?", "Point", None, *LOOK))
    first, final = outputs[0], outputs[-1]
    assert first[CHAT][-1] == {"role": "assistant", "content": ""} and first[2] == ""  # question box cleared
    assert final[0].last_region == {"kind": "point", "xyxy": [64, 64, 64, 64]}
    assert final[CHAT][0]["content"] == "What is in the marked region? `<region>`"
    assert final[CHAT][1]["role"] == "assistant"


def test_follow_up_reuses_the_image_embedding(handlers, ct, engine, monkeypatch):
    first = _final(handlers.ask(ct, "Describe the image.", "None", None, *LOOK))[0]
    calls = []
    monkeypatch.setattr(engine, "set_image", lambda rgb: calls.append(rgb))
    second = _final(handlers.ask(first, "And the bones?", "None", None, *LOOK))
    assert calls == [] and second[0].handle is first.handle
    assert len(second[0].history) == 2 and len(second[CHAT]) == 4


def test_segment_gives_overlay_area_downloads_and_routing(handlers, ct, engine):
    final = _final(handlers.segment(ct, "Please segment the spine.", "None", None, *LOOK))
    session = final[0]
    mask = session.answer.mask
    assert mask is not None and mask.shape == (128, 128)
    overlay = _pixels(final[OVERLAY])
    assert overlay.shape == (128, 128, 3) and not np.array_equal(overlay, ct.rgb)
    assert f"{int(mask.sum()):,} pixels" in final[AREA] and "mm²" in final[AREA]
    names = sorted(Path(p).name for p in final[FILES])
    assert names == ["mask.nii.gz", "mask.png", "record.json"]
    files = {Path(p).name: Path(p) for p in final[FILES]}
    np.testing.assert_array_equal(np.asarray(Image.open(files["mask.png"])) > 0, mask)
    assert nib.load(files["mask.nii.gz"]).get_fdata().sum() == mask.sum()
    record = json.loads(files["record.json"].read_text())
    assert record["question"] == "Please segment the spine." and record["model"]["name"] == engine.info.name
    assert record["settings"]["force_answer"] == "<SEG>" and record["image"]["modality"] == "CT"
    assert "CT_small" not in files["record.json"].read_text()  # no file names in the record
    figure = final[PLOT]
    assert isinstance(figure, go.Figure)
    assert np.asarray(figure.data[0].z).shape == (engine.info.n_layers, len(session.answer.experts[0]))


def test_nifti_mask_download_goes_back_into_the_volume(handlers):
    coronal = handlers.change_view(
        handlers.load(str(NIFTI), False)[SESSION], 1, "coronal", imageio.AUTO, False
    )
    session = coronal[SESSION]
    final = _final(handlers.segment(session, "Segment the brain.", "None", None, *LOOK))
    path = next(Path(p) for p in final[FILES] if p.endswith(".nii.gz"))
    volume = nib.load(path).get_fdata()
    assert volume.shape == (33, 41, 25)
    restored = replace(session.image, volume=volume.astype(np.float32))
    np.testing.assert_array_equal(
        imageio.slice_nifti(restored, "coronal", session.index) > 0, final[0].answer.mask
    )
    assert volume.sum() == final[0].answer.mask.sum()  # nothing outside the asked slice


def test_restyle_and_new_conversation(handlers, ct):
    session = _final(handlers.segment(ct, "Segment the body.", "None", None, *LOOK))[0]
    fill = _pixels(handlers.restyle(session, 0.5, "fill", "orange"))
    outline = _pixels(handlers.restyle(session, 0.5, "outline", "orange"))
    blue = _pixels(handlers.restyle(session, 0.5, "fill", "sky blue"))
    assert not np.array_equal(fill, outline) and not np.array_equal(fill, blue)
    fresh = handlers.new_chat(session)
    assert fresh[0].history == () and fresh[0].answer is None and fresh[1] == [] and fresh[2] is None


def test_answer_without_seg_says_no_mask(ct):
    answer = Answer(
        text="A CT slice.",
        token_ids=(1, 2),
        mask=None,
        mask_logits=None,
        low_res_logits=None,
        experts=((0, 1),),
    )
    session = steps.after_answer(ct, "Describe the image.", answer, None, None)
    assert steps.mask_summary(session) == texts.NO_MASK_NOTICE
    assert steps.mask_overlay(session, *LOOK) is None
    assert "no `<SEG>`, no mask" in render_chat(session.history, answer)[-1]["content"]


def test_segment_with_an_empty_box_asks_the_last_question_for_a_mask(handlers, ct):
    """Regression: Ask clears the question box, so pressing Segment next raised 'Type a question first'."""
    asked = _final(handlers.ask(ct, "What does this image show?", "None", None, *LOOK))
    assert asked[2] == gr.skip() and asked[0].history[-1][0] == "What does this image show?"
    final = _final(handlers.segment(asked[0], "", "None", None, *LOOK))
    session = final[0]
    assert [q for q, _ in session.history] == ["What does this image show?"] * 2
    assert session.answer.mask is not None and session.last_settings.force_answer == texts.SEG_FORCE_ANSWER
    fresh = handlers.new_chat(session)[0]
    with refused("Type a question"):
        _only(handlers.segment(fresh, "", "None", None, *LOOK))


def test_segment_with_a_region_and_an_empty_box_asks_for_the_structure_in_the_region(handlers, ct):
    """Issue 20: a marked structure and Segment gave a useless forced mask of the last question; now it asks the
    question the model is trained for, unforced, so it may answer "no structure there" in words."""
    from engine.conversation import REGION_SEGMENT_QUESTION

    session, _, _ = handlers.click(ct, "Point", _click(64, 64))
    asked = _final(handlers.ask(session, "What is in the marked region?", "Point", None, *LOOK))
    final = _final(handlers.segment(asked[0], "", "Point", None, *LOOK))
    session = final[0]
    assert session.history[-1][0] == f"{REGION_SEGMENT_QUESTION} <region>"
    assert session.last_settings.force_answer is None and session.last_region["kind"] == "point"
    assert steps.segment_request(session, "  ", "Sketch") == (REGION_SEGMENT_QUESTION, None)
    assert steps.segment_request(session, "Segment the bone.", "Point") == ("Segment the bone.", texts.SEG_FORCE_ANSWER)


def test_chat_never_shows_an_empty_or_unfinished_answer_without_a_note(ct):
    """Issue 20: empty answers, half templates ("The image shows.") and empty masks each get a clear note."""
    def chat(text: str, mask: np.ndarray | None) -> str:
        answer = Answer(text=text, token_ids=(1,), mask=mask, mask_logits=None, low_res_logits=None, experts=((0,),))
        return render_chat(steps.after_answer(ct, "Describe the image.", answer, None, None).history, answer)[-1][
            "content"]

    assert texts.CHAT_UNFINISHED in chat("", None) and texts.CHAT_UNFINISHED in chat("The image shows.", None)
    assert texts.CHAT_UNFINISHED not in chat("This is a CT image of the spine.", None)
    assert chat("", np.zeros((4, 4), bool)) == texts.CHAT_EMPTY_MASK


def test_a_mask_only_answer_says_so_in_the_chat(handlers, ct):
    """Regression: a forced `<SEG>` answer showed '(no text)' above its mask note in the browser."""
    final = _final(handlers.segment(ct, "Please segment the spine.", "None", None, *LOOK))
    answer = final[0].answer
    assert answer.text.strip() == "" and answer.has_mask  # the forced answer is just <SEG>
    assert final[CHAT][-1]["content"] == texts.CHAT_MASK_ONLY.format(pixels=answer.mask_area)
    assert "overlay" in final[CHAT][-1]["content"] and "no text" not in final[CHAT][-1]["content"]


def test_a_mistake_quotes_region_as_text_and_logs_one_line(handlers, ct, caplog):
    """Bugs: a message quoting `<region>` was cut at that word (rendered as HTML), and every user mistake
    wrote a full traceback to the server log."""
    caplog.set_level("INFO")
    with pytest.warns(UserWarning) as record:
        _only(handlers.ask(ct, "What is <region>?", "None", None, *LOOK))
    assert "&lt;region&gt;" in str(record[0].message)
    mine = [r for r in caplog.records if r.name.startswith("portal")]
    assert len(mine) == 1 and mine[0].exc_info is None and "\n" not in mine[0].getMessage()


def test_model_gate_refuses_only_when_the_model_queue_is_full(engine, monkeypatch):
    """Bug: the queue limit was global, so uploads got "Queue is full" along with questions."""
    from portal import ask_tab

    h = AskHandlers(portal_context(engine))
    monkeypatch.setattr(ask_tab, "model_queue_length", lambda _blocks: texts.MODEL_QUEUE_MAX_SIZE - 1)
    inputs = (None, "Describe the image.", "None", None, *LOOK)
    assert all(v["is_valid"] for v in h.model_gate(*inputs))
    monkeypatch.setattr(ask_tab, "model_queue_length", lambda _blocks: texts.MODEL_QUEUE_MAX_SIZE)
    verdicts = h.model_gate(*inputs)
    assert len(verdicts) == len(inputs) and verdicts[1]["is_valid"] is False and "busy" in verdicts[1]["message"]


def test_image_outputs_are_private_files_not_arrays(handlers, ct):
    """Bug: Gradio rewrote the cached PNG of an image array in place, so the same upload shown to many
    students at once was served half-written to some ("Response content shorter than Content-Length")."""
    out = handlers.change_view(ct, 1, "axial", "bone", False)
    for shown in (out[PREVIEW], out[EDITOR]):
        assert isinstance(shown, str) and (Path(shown).stat().st_mode & 0o777) == 0o600
    np.testing.assert_array_equal(_pixels(out[EDITOR]), out[SESSION].rgb)
