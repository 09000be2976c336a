"""Issue 16 in the Quiz, Case library and Instructor tabs: a user mistake is one readable warning with every
output unchanged (no red "Error" labels), and the instructor's raw upload leaves Gradio's cache on its first read."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import gradio as gr
import httpx
import nibabel as nib
import numpy as np
import pytest
from gradio_client import Client
from PIL import Image, PngImagePlugin

from cases import CaseStore
from cases.samples import sample_draft
from portal.instructor_tab import InstructorHandlers
from portal.library_tab import LibraryHandlers
from portal.quiz_tab import QuizHandlers, QuizState
from portal.refusals import UserMistake, refusing
from portal.uploads import PrivateUploads, UploadGone


@pytest.fixture
def store(tmp_path: Path) -> CaseStore:
    s = CaseStore(str(tmp_path / "refusals.sqlite"), seed_starter=False)
    s.create_case(s.operator_session(), sample_draft("Alpha lesion", size=(40, 48), slug="alpha"))
    return s


def assert_refused(caplog: pytest.LogCaptureFixture, match: str, handler, *args) -> None:
    """One warning (escaped), every output gr.skip(), one INFO log line and no traceback."""
    caplog.clear()
    with pytest.warns(UserWarning, match=match) as caught:
        outputs = handler(*args)
    assert len(caught) == 1
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert outputs and all(value == gr.skip() for value in outputs)
    lines = [r for r in caplog.records if r.name.startswith("portal")]
    assert len(lines) == 1 and "refused a request" in lines[0].getMessage() and lines[0].exc_info is None


def test_quiz_mistakes_are_one_warning_with_every_output_unchanged(store, caplog) -> None:
    """Bug: a quiz mistake (submit before Start, no answer, a deleted case) raised gr.Error, which painted red
    "Error" labels over the result, the comparison image and the discussion."""
    caplog.set_level("INFO", logger="portal")
    h = QuizHandlers(store)
    assert_refused(caplog, "Press Start", h.submit, "yes", "", None, "", "", QuizState())
    state = h.start(store.get_case("alpha").id, QuizState())[0]
    assert_refused(caplog, "predict, then reveal", h.submit, None, "  ", None, "", "", state)
    assert_refused(caplog, "no longer in the case", h.choose_question, 10_000, state)
    store.delete_case(store.operator_session(), state.case_id)
    assert_refused(caplog, "not found|no case|unknown", h.start, state.case_id, QuizState())
    assert_refused(caplog, "no published case", h.start, None, QuizState())


def test_library_mistakes_are_one_warning_with_every_output_unchanged(store, caplog) -> None:
    """Bug: "Open in the Ask tab" without a case, or a case unpublished meanwhile, raised gr.Error over the
    case image, the hand-off file, the suggested question and the hint."""
    caplog.set_level("INFO", logger="portal")
    h = LibraryHandlers(store)
    assert_refused(caplog, "Pick a case first", h.handoff, None)
    hidden = store.create_case(store.operator_session(), sample_draft("Hidden", published=False, slug="hidden"))
    assert_refused(caplog, "", h.open_case, hidden.id, "as stored")
    assert_refused(caplog, "", h.redraw, hidden.id, [], "as stored")


def test_instructor_mistakes_are_one_warning_with_every_output_unchanged(store, caplog) -> None:
    """Bug: instructor mistakes (no file, no login, no case picked) raised gr.Error over the form."""
    caplog.set_level("INFO", logger="portal")
    h = InstructorHandlers(store)
    assert_refused(caplog, "Upload an image first", h.read, None, "axial", 0, "")
    assert_refused(caplog, "Log in as an instructor", h.load, None, store.get_case("alpha").id)
    assert_refused(caplog, "Pick a case first", h.delete, None, None)
    assert_refused(caplog, "instructor action", h.export_csv, None)
    assert_refused(caplog, "upload it again", h.read, "/nonexistent/gone.png", "axial", 0, "")


def test_user_text_in_a_refusal_is_shown_as_text_and_server_faults_stay_distinct(caplog) -> None:
    """Bug: a message quoting `<region>` was cut off at that word (the toast renders HTML). A server fault is
    no user mistake: its traceback is logged and the message is generic (the exception's type only)."""
    caplog.set_level("INFO", logger="portal")

    @refusing(2)
    def mistaken() -> tuple:
        raise UserMistake("The question contains <region> but nothing is marked.")

    with pytest.warns(UserWarning, match="contains &lt;region&gt; but"):
        assert mistaken() == (gr.skip(), gr.skip())

    @refusing(1)
    def broken() -> None:
        raise RuntimeError("database went away at /srv/secret/path")

    caplog.clear()
    with pytest.warns(UserWarning) as caught:
        assert broken() == gr.skip()
    shown = str(caught[0].message)
    assert "RuntimeError" in shown and "secret" not in shown
    [record] = [r for r in caplog.records if r.name.startswith("portal")]
    assert record.levelname == "ERROR" and record.exc_info is not None


@pytest.fixture
def gradio_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "gradio-cache"
    folder.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder


def test_private_uploads_move_the_raw_file_and_delete_their_copy(gradio_cache: Path, tmp_path: Path) -> None:
    """The raw upload leaves Gradio's cache on its first take; the private copy is 0600 in a 0700 folder, is
    reused for re-reads, is not another session's, and goes on release, on a new upload and when idle."""
    now = [0.0]
    uploads = PrivateUploads(parent=tmp_path, max_idle_s=60, clock=lambda: now[0])
    raw = gradio_cache / "abc123" / "DOE_JANE.nii.gz"
    raw.parent.mkdir()
    raw.write_bytes(b"patient bytes")
    private = uploads.take("s1", raw)
    assert not raw.exists() and not raw.parent.exists() and private.read_bytes() == b"patient bytes"
    assert "DOE" not in private.name and private.name.endswith(".nii.gz")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(private.parent.stat().st_mode) == 0o700
    assert uploads.take("s1", raw) == private  # a re-read of another slice
    with pytest.raises(UploadGone):
        uploads.take("s2", raw)  # another browser session cannot reach it
    raw.parent.mkdir()
    raw.write_bytes(b"new upload")
    newer = uploads.take("s1", raw)
    assert not private.exists() and newer.read_bytes() == b"new upload"
    uploads.release("s1")
    assert not newer.exists() and len(uploads) == 0
    other = gradio_cache / "def456" / "x.png"
    other.parent.mkdir()
    other.write_bytes(b"png")
    kept = uploads.take("s3", other)
    now[0] = 61.0
    with pytest.raises(UploadGone):
        uploads.take("s3", other)  # idle past the time to live: deleted
    assert not kept.exists()


def _phi_png(path: Path) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("PatientName", "DOE^JANE")
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(path, pnginfo=info)
    return path


def test_the_instructor_tab_leaves_no_raw_upload_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Bug: the instructor tab left the raw upload (DICOM header, EXIF, PNG text) in Gradio's cache, fetchable
    by URL, until the 15-minute sweep. Now it is gone after the first read, re-reading another slice still
    works (from a private copy), and the copy goes when the tab closes."""
    from portal_helpers import load_test_engine

    from portal.app import build_app, launch_kwargs
    from portal.context import PortalContext, PortalSettings

    store = CaseStore(str(tmp_path / "served.sqlite"), seed_starter=False)
    settings = PortalSettings(spill_dir=tmp_path, max_new_tokens=4)
    ctx = PortalContext(engine=load_test_engine(), store=store, settings=settings)
    demo = build_app(ctx)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs(settings, store))
    caplog.set_level("DEBUG", logger="portal")
    try:
        client = Client(demo.local_url, verbose=False)
        volume = np.zeros((24, 24, 5), np.int16)
        volume[:12, :, 0] = 800  # the first slice is bright in one half, the last in the other
        volume[12:, :, 4] = 800
        nifti = tmp_path / "DOE_JANE_CT.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.eye(4)), nifti)
        for name, data in (("DOE_JANE_CT.nii.gz", nifti.read_bytes()),
                           ("DOE_JANE.png", _phi_png(tmp_path / "p.png").read_bytes())):  # fmt: skip
            cached = httpx.post(f"{demo.local_url}gradio_api/upload", files={"files": (name, data)})
            server_path = cached.json()[0]
            file = {"path": server_path, "meta": {"_type": "gradio.FileData"}}
            editor, note = client.predict(file, "axial", 0, "", api_name="/read_upload")
            assert note and "DOE" not in note
            assert not Path(server_path).exists()
            assert httpx.get(f"{demo.local_url}gradio_api/file={server_path}").status_code != 200
        cached = httpx.post(f"{demo.local_url}gradio_api/upload",
                            files={"files": ("DOE_JANE_CT.nii.gz", nifti.read_bytes())})  # fmt: skip
        file = {"path": cached.json()[0], "meta": {"_type": "gradio.FileData"}}
        first = client.predict(file, "axial", 0, "", api_name="/read_upload")[0]
        # A re-read sends the File component's value again, as the browser does (gradio_client would upload
        # the path again from this machine's disk, where it no longer is).
        endpoint = client.endpoints[client._infer_fn_index("/read_upload", None)]
        monkeypatch.setattr(endpoint, "process_input_files", lambda *data: data)
        last = client.predict(file, "axial", 4, "", api_name="/read_upload")[0]
        slices = (first, last)
        pixels = [np.asarray(Image.open(e["background"]), np.float32) for e in slices]
        assert not np.array_equal(*pixels)  # another slice, read from the private copy
        assert np.array_equal(pixels[0][::-1], pixels[1]) or np.array_equal(pixels[0][:, ::-1], pixels[1])
        private = list(tmp_path.glob("medplib-private-uploads-*/*"))
        assert len(private) == 1 and "DOE" not in private[0].name
        client.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and private[0].exists():
            time.sleep(0.5)
        assert not private[0].exists()  # the closed tab took its private copy with it
        assert "DOE" not in caplog.text  # file names are never logged
    finally:
        demo.close()
