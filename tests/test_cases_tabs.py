"""Library, quiz and instructor tab handlers, without a browser (the browser test is in tests/browser)."""

from __future__ import annotations

import io
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from cases import CaseStore
from cases.samples import sample_draft
from portal.context import PortalSettings
from portal.instructor_tab import CaseForm, InstructorHandlers, build_instructor_tab, read_upload
from portal.library_tab import LibraryHandlers, ask_handoff, build_library_tab, case_choices
from portal.quiz_tab import QuizHandlers, QuizState, build_quiz_tab, drawn_mask, progress_figure
from portal.refusals import UserMistake

PASSWORD = "a long enough password"


class Ctx:
    def __init__(self, store: CaseStore | None) -> None:
        self.store, self.engine, self.settings = store, None, PortalSettings()


@pytest.fixture
def store(tmp_path: Path) -> CaseStore:
    s = CaseStore(str(tmp_path / "tabs.sqlite"), seed_starter=False)
    op = s.operator_session()
    s.create_case(op, sample_draft("Alpha lesion", size=(40, 48), slug="alpha"))
    s.create_case(op, sample_draft("Beta CT", modality="CT", slug="beta"))
    s.create_case(op, sample_draft("Hidden", published=False, slug="hidden"))
    s.create_instructor(op, "teacher", PASSWORD)
    return s


def refused(match: str, handler, *args) -> None:
    """A user mistake: one warning (not a gr.Error), every output unchanged (gr.skip())."""
    with pytest.warns(UserWarning, match=match) as caught:
        outputs = handler(*args)
    assert len([w for w in caught if issubclass(w.category, UserWarning)]) == 1
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert outputs and all(value == gr.skip() for value in outputs)


def _layer(mask: np.ndarray) -> np.ndarray:
    layer = np.zeros((*mask.shape, 4), np.uint8)
    layer[mask] = (230, 159, 0, 255)
    return layer


def test_tabs_build_with_and_without_a_store(store: CaseStore) -> None:
    with gr.Blocks():
        for builder in (build_library_tab, build_quiz_tab, build_instructor_tab):
            builder(Ctx(store))
            builder(Ctx(None))


def test_library_filters_and_case_card(store: CaseStore) -> None:
    assert [label for label, _ in case_choices(store, "All", "All", "All", "")] == [
        "Alpha lesion — MR",
        "Beta CT — CT",
    ]
    h = LibraryHandlers(store)
    update, note = h.search("CT", "All", "All", "")
    assert [label for label, _ in update["choices"]] == ["Beta CT — CT"] and note == "1 case"  # issue 21: was "1 cases"
    alpha = store.get_case("alpha")
    image, masks, card = h.open_case(alpha.id, "as stored")
    assert image.shape == (40, 48, 3) and masks["value"] == ["lesion"]
    assert "A bright round lesion" in card and "Key learning points" in card and "CC0-1.0" in card
    assert not np.array_equal(h.redraw(alpha.id, [], "as stored"), image)  # mask outline toggled off


def test_ask_handoff_gives_the_image_file_and_a_question(store: CaseStore, tmp_path: Path) -> None:
    alpha = store.get_case("alpha")
    handoff = ask_handoff(store, alpha.id, tmp_path)
    assert handoff.question == "Draw the lesion."
    np.testing.assert_array_equal(np.asarray(Image.open(handoff.image_path)), alpha.images[0].rgb())


def test_quiz_segmentation_attempt_scores_and_reveals(store: CaseStore) -> None:
    h = QuizHandlers(store)
    alpha = store.get_case("alpha")
    state, header, questions, *_ = h.start(alpha.id, QuizState())
    assert "Alpha" not in header and "Unknown case" in header  # the title would give the answer away
    seg = next(q for q in alpha.questions if q.kind == "segmentation")
    state = h.choose_question(seg.id, state)[0]
    reference = alpha.images[0].mask("lesion").array()
    half = reference.copy()
    half[:, 24:] = False
    big = np.kron(half, np.ones((2, 2), bool))  # the editor canvas at twice the image size
    out = h.submit(None, "", {"background": None, "layers": [_layer(big)], "composite": None}, "", "", state)
    state, browser_id, result = out[0], out[1], out[2]
    expected = 2 * half.sum() / (half.sum() + reference.sum())
    assert f"Dice **{expected:.3f}**" in result and browser_id.startswith("anon-")
    assert store.student_attempts(browser_id)[0].dice == pytest.approx(expected)
    assert out[5].startswith("## Alpha lesion")  # discussion revealed
    only_ref = h.toggle(["reference"], state)
    none = h.toggle([], state)
    assert not np.array_equal(only_ref, none)
    refused("Already submitted", h.submit, None, "", {"layers": [_layer(big)]}, "", browser_id, state)


def test_quiz_closed_question_predict_then_reveal(store: CaseStore) -> None:
    h = QuizHandlers(store)
    alpha = store.get_case("alpha")
    state = h.start(alpha.id, QuizState())[0]
    refused("predict, then reveal", h.submit, None, "", None, "", "", state)
    out = h.submit("yes", "", None, "course-42", "anon-1", state)
    assert "✅" in out[2] and "Reference answer:** yes" in out[2] and "No cached model answer" in out[2]
    assert store.student_attempts("course-42")[0].correct is True
    assert len(progress_figure(out[0].progress).data) == 1


def test_drawn_mask_reads_alpha_of_every_layer() -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    a[0, 0, 3] = 255
    b = np.zeros((4, 4, 4), np.uint8)
    b[3, 3, 3] = 10
    mask = drawn_mask({"layers": [a, b]}, (4, 4))
    assert mask.sum() == 2 and mask[0, 0] and mask[3, 3]
    assert drawn_mask({"layers": []}, (4, 4)) is None


def _form(**overrides: str) -> tuple[str, ...]:
    values = dict(
        title="Uploaded case", modality="CT", anatomy="spine", plane="axial", difficulty="resident",
        vignette="v", findings="f", discussion="d", key_points="one\ntwo", tags="a, b", source="upload",
        provenance="drawn by the instructor", licence="CC-BY-4.0", mask_label="bone",
        closed_prompt="Which window?", closed_choices="bone, lung", closed_answer="bone", open_prompt="",
        open_answer="", open_synonyms="",
    )  # fmt: skip
    values.update(overrides)
    return tuple(CaseForm(**values).__dict__.values())


def test_instructor_actions_need_a_login(store: CaseStore, tmp_path: Path) -> None:
    h = InstructorHandlers(store)
    with pytest.raises(UserMistake, match="wrong instructor"):  # programmatic login raises; the UI uses a cookie
        h.login("teacher", "not the password")
    png = tmp_path / "x.png"
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(png)
    upload = h.read(str(png), "axial", 0, "")[0]
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:10] = True
    editor = {"layers": [_layer(mask)]}
    refused("instructor action", h.save, None, None, upload, editor, None, False, False, *_form())
    refused("instructor action", h.set_published, None, store.get_case("alpha").id, False)
    refused("instructor action", h.export_csv, None)
    session = h.login("teacher", PASSWORD)[0]
    status, _menu = h.save(session, None, upload, editor, None, True, False, *_form())
    created = store.list_cases(text="Uploaded case")[0]
    assert status.startswith(f"Created case #{created.id}") and created.n_questions == 2
    assert store.get_case(created.id).images[0].mask("bone").array().sum() == 25
    h.set_published(session, created.id, False)
    assert store.list_cases(text="Uploaded case") == ()
    assert Path(h.export_csv(session)).read_text().startswith("attempt_id,")


def test_dicom_upload_is_deidentified_and_needs_review(store: CaseStore, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    upload = read_upload(get_testdata_file("CT_small.dcm", download=False), preset="bone")
    assert upload.rgb.shape == (128, 128, 3) and upload.needs_review and "de-identified" in upload.note
    assert upload.spacing_mm is not None
    h = InstructorHandlers(store)
    session = h.login("teacher", PASSWORD)[0]
    editor = {"layers": [_layer(upload.rgb[..., 0] > upload.rgb[..., 0].mean())]}
    refused("burned-in", h.save, session, None, upload, editor, None, True, False, *_form(title="CT"))
    h.save(session, None, upload, editor, None, True, True, *_form(title="CT checked"))
    assert store.list_cases(text="CT checked")[0].published


def test_png_metadata_is_stripped_and_wrong_mask_size_refused(store: CaseStore, tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("PatientName", "DOE^JANE")
    path = tmp_path / "phi.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path, pnginfo=info)
    upload = read_upload(path)
    assert "PatientName" in upload.note
    mask_path = tmp_path / "mask.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mask_path)
    h = InstructorHandlers(store)
    session = h.login("teacher", PASSWORD)[0]
    refused("mask file is", h.save, session, None, upload, None, str(mask_path), False, False, *_form())


def test_oversized_upload_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (21 * 1024 * 1024))
    with pytest.raises(Exception, match="MiB"):
        read_upload(big)
    bomb = io.BytesIO()
    Image.new("L", (5000, 5000)).save(bomb, format="PNG")
    (tmp_path / "bomb.png").write_bytes(bomb.getvalue())
    with pytest.raises(Exception, match="limit is 4096"):
        read_upload(tmp_path / "bomb.png")


def test_stored_answers_are_bounded_and_attempts_rate_limited(store: CaseStore) -> None:
    """Bugs: a 10 MB quiz answer was accepted, and one client stored 100 attempts in 30 s."""
    from cases.errors import InvalidCaseData
    from cases.store import MAX_ANSWER_CHARS, MAX_ATTEMPTS_PER_STUDENT_MINUTE

    question = next(q for q in store.get_case("alpha").questions if q.kind == "closed")
    with pytest.raises(InvalidCaseData, match="at most"):
        store.record_attempt(question.id, "student-1", "x" * (MAX_ANSWER_CHARS + 1))
    with pytest.raises(InvalidCaseData, match="1-80"):
        store.record_attempt(question.id, "p" * 81, "yes")
    for _ in range(MAX_ATTEMPTS_PER_STUDENT_MINUTE):
        store.record_attempt(question.id, "student-1", "yes")
    with pytest.raises(InvalidCaseData, match="too many answers"):
        store.record_attempt(question.id, "student-1", "yes")
    store.record_attempt(question.id, "student-2", "yes")  # another student is not held back
    assert len(store.student_attempts("student-1")) == MAX_ATTEMPTS_PER_STUDENT_MINUTE


def test_quiz_session_submits_are_rate_limited(store: CaseStore) -> None:
    """Bug: one browser session could submit as fast as a script can (one client stored 100 attempts in 30 s)."""
    from portal.quiz_tab import SESSION_ATTEMPTS_PER_MINUTE

    h = QuizHandlers(store)
    alpha = store.get_case("alpha")
    closed = next(q for q in alpha.questions if q.kind == "closed")
    state = h.start(alpha.id, QuizState())[0]
    for i in range(SESSION_ATTEMPTS_PER_MINUTE):
        state = h.choose_question(closed.id, state)[0]
        state = h.submit("yes", "", None, f"p-{i}", "anon-1", state)[0]
    state = h.choose_question(closed.id, state)[0]
    refused("wait a moment", h.submit, "yes", "", None, "p-x", "anon-1", state)
