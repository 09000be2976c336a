"""Instructor tab: log in, create or edit cases from uploads, publish, delete, export quiz results.

Uploads (PNG, JPEG, DICOM, NIfTI) are read by `engine.imageio.read_image` (no torch). DICOM files are
de-identified (`cases.deid`, PS3.15 Annex E) before their pixels are read, and PNG/JPEG metadata is
stripped by re-encoding; only the pixels (and pixel spacing) are stored. Files whose burned-in
annotation status is not "NO" can only be published after the instructor confirms the pixels were
checked. Every action goes through `CaseStore` methods that refuse sessions not issued by `login`.

The raw upload leaves Gradio's cache on its first read (`portal.uploads.PrivateUploads`): re-reads of another
slice use the session's private copy, deleted on a new upload, a saved case or a closed tab. A user mistake is
one warning with every output unchanged (`portal.refusals`), never a red error over the form.
"""

from __future__ import annotations

import secrets
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from cases import (
    CaseDraft,
    CaseRecord,
    CaseStore,
    CaseStoreError,
    ImageDraft,
    InstructorSession,
    InvalidCaseData,
    MaskDraft,
    QuestionDraft,
)
from cases.convert import AUDIT_COLUMNS
from cases.deid import deidentify_bytes, strip_image_metadata
from cases.errors import UNTRUSTED_INPUT_ERRORS
from cases.imaging import MAX_UPLOAD_BYTES, decode_mask
from cases.records import DIFFICULTIES
from cases.store import MAX_USERNAME_CHARS
from portal import texts
from portal.exports import write_private
from portal.instructor_auth import LOGIN_JS, LOGOUT_JS, InstructorGate
from portal.library_tab import NO_STORE, temp_file
from portal.quiz_tab import BRUSH_COLOR, drawn_mask
from portal.refusals import UserMistake, refusing
from portal.safe_text import plain
from portal.uploads import PrivateUploads, UploadGone

PLANES = ("axial", "coronal", "sagittal")
AUDIT_SHOWN = 50
LOGGED_OUT = "Not logged in. Instructor accounts are created with `python -m cases add-instructor NAME`."
NIFTI_SUFFIXES = (".nii", ".nii.gz")
EXPORT_DIR = Path(tempfile.gettempdir()) / "medplib-portal-exports"
PICK_A_CASE = "Pick a case first."
EDIT_WARNING = (
    "Saving changes replaces the case's images, masks and questions: quiz attempts and cached model answers "
    "of the old questions are deleted. Export the quiz results first if you need them."
)


@dataclass(frozen=True)
class LoadedUpload:
    """An upload turned into what a case stores: (H, W, 3) uint8 pixels, spacing, and review status."""

    rgb: np.ndarray
    spacing_mm: tuple[float, float] | None
    modality: str | None
    needs_review: bool
    note: str
    owner: str | None = None  # the browser session holding the private copy of the raw upload, if any


def read_upload(
    path: str | Path, *, plane: str = "axial", index: int = 0, preset: str | None = None
) -> LoadedUpload:
    """Read an uploaded PNG/JPEG/DICOM/NIfTI file into stored-safe pixels (see module docstring).

    Raises InvalidCaseData, and only that, for any file that cannot be read (never a decoder's exception);
    messages never name the file.
    """
    path = Path(path)
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise InvalidCaseData(f"The file is over {MAX_UPLOAD_BYTES // 2**20} MiB; upload one slice or a smaller file")
    data = path.read_bytes()
    try:
        return _read_upload_bytes(path, data, plane, index, preset)
    except InvalidCaseData:
        raise
    except Exception as error:  # the reader boundary: decoders raise many types for damaged files
        raise InvalidCaseData(f"The file is damaged or not a supported image ({type(error).__name__}).") from error


def _read_upload_bytes(path: Path, data: bytes, plane: str, index: int, preset: str | None) -> LoadedUpload:
    if data[128:132] == b"DICM":
        return _read_dicom(data, plane, index, preset)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return _read_with_imageio(
            path, plane, index, preset, needs_review=False, note="NIfTI: pixels only kept."
        )
    stripped = strip_image_metadata(data)
    dropped = (
        f" Dropped metadata: {plain(', '.join(stripped.dropped_metadata))}."
        if stripped.dropped_metadata
        else ""
    )
    return LoadedUpload(stripped.rgb, None, None, False, f"Photo re-encoded without metadata.{dropped}")


def _read_dicom(data: bytes, plane: str, index: int, preset: str | None) -> LoadedUpload:
    clean, report = deidentify_bytes(data)
    note = (f"DICOM de-identified (Annex E basic profile): {report.removed} removed, {report.emptied} emptied, "
            f"{report.dummied} replaced, {report.uids_remapped} UIDs remapped, {report.private_removed} private "
            f"tags and {report.curves_overlays_removed} overlay/curve elements removed.")  # fmt: skip
    if report.needs_review:
        note += f" ⚠ {report.review_reason}"
    with tempfile.TemporaryDirectory(prefix="medplib-deid-") as folder:
        tmp = Path(folder) / "deidentified.dcm"
        tmp.write_bytes(clean)
        return _read_with_imageio(tmp, plane, index, preset, needs_review=report.needs_review, note=note)


def _read_with_imageio(path: Path, plane: str, index: int, preset: str | None, *, needs_review: bool,
                       note: str) -> LoadedUpload:  # fmt: skip
    try:
        from engine import imageio
    except ImportError as error:  # the portal always ships it; this guards partial installs
        raise InvalidCaseData("engine.imageio is needed to read DICOM/NIfTI uploads") from error
    try:
        image = imageio.read_image(path)
        rgb = imageio.to_rgb(image, index=int(index), plane=plane, preset=preset or None)
    except UNTRUSTED_INPUT_ERRORS as error:  # ImageReadError is a ValueError; readers may raise others
        raise InvalidCaseData(str(error) or type(error).__name__) from None
    spacing = imageio.frame_spacing(image, plane)
    return LoadedUpload(
        rgb, None if spacing is None else tuple(map(float, spacing)), image.modality, needs_review, note
    )


@dataclass(frozen=True)
class CaseForm:
    """The text fields of the case form, in the order of the UI components."""

    title: str
    modality: str
    anatomy: str
    plane: str
    difficulty: str
    vignette: str
    findings: str
    discussion: str
    key_points: str  # one per line
    tags: str  # comma-separated
    source: str
    provenance: str
    licence: str
    mask_label: str
    closed_prompt: str
    closed_choices: str  # comma-separated
    closed_answer: str
    open_prompt: str
    open_answer: str
    open_synonyms: str  # comma-separated


def _split(text: str, sep: str = ",") -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(sep) if part.strip())


def build_draft(form: CaseForm, upload: LoadedUpload, mask: np.ndarray, *, published: bool) -> CaseDraft:
    """A CaseDraft from the form, the loaded image and the (H, W) bool reference mask."""
    label = form.mask_label.strip() or "structure"
    questions = [
        QuestionDraft("segmentation", f"Please segment the {label} in this image.", label, target_label=label)
    ]
    if form.closed_prompt.strip():
        questions.insert(0, QuestionDraft("closed", form.closed_prompt, form.closed_answer.strip(),
                                          choices=_split(form.closed_choices)))  # fmt: skip
    if form.open_prompt.strip():
        questions.append(QuestionDraft("open", form.open_prompt, form.open_answer.strip(),
                                       synonyms=_split(form.open_synonyms)))  # fmt: skip
    return CaseDraft(
        title=form.title, modality=form.modality, anatomy=form.anatomy, plane=form.plane,
        difficulty=form.difficulty, vignette=form.vignette, findings=form.findings, discussion=form.discussion,
        key_points=_split(form.key_points, "\n"), tags=_split(form.tags), source=form.source,
        provenance=form.provenance, licence=form.licence, published=published,
        images=(ImageDraft(upload.rgb, (MaskDraft(label, mask),), upload.spacing_mm),), questions=tuple(questions),
    )  # fmt: skip


def form_from_case(case: CaseRecord) -> CaseForm:
    """Fill the form from a stored case (first closed/open question, first mask label)."""
    s = case.summary
    closed = next((q for q in case.questions if q.kind == "closed"), None)
    opened = next((q for q in case.questions if q.kind == "open"), None)
    seg = next((q for q in case.questions if q.kind == "segmentation"), None)
    return CaseForm(
        title=s.title, modality=s.modality, anatomy=s.anatomy, plane=s.plane, difficulty=s.difficulty,
        vignette=case.vignette, findings=case.findings, discussion=case.discussion,
        key_points="\n".join(case.key_points), tags=", ".join(s.tags), source=case.source,
        provenance=case.provenance, licence=case.licence,
        mask_label=seg.target_label if seg and seg.target_label else case.images[0].masks[0].label,
        closed_prompt=closed.prompt if closed else "", closed_choices=", ".join(closed.choices) if closed else "",
        closed_answer=closed.reference_answer if closed else "", open_prompt=opened.prompt if opened else "",
        open_answer=opened.reference_answer if opened else "", open_synonyms=", ".join(opened.synonyms) if opened else "",
    )  # fmt: skip


class InstructorHandlers:
    """Event handlers of the instructor tab (plain methods: tested without a browser)."""

    def __init__(self, store: CaseStore, uploads: PrivateUploads | None = None) -> None:
        self.store = store
        self.uploads = uploads if uploads is not None else PrivateUploads(max_idle_s=texts.SESSION_TTL_S)

    def login(
        self, username: str, password: str, client: str = "local"
    ) -> tuple[InstructorSession, str, Any, Any]:
        """Programmatic login (tests, scripts; raises UserMistake); the web UI logs in through instructor_auth."""
        session = self._call(self.store.login, username.strip(), password, client)
        return session, *self.after_login(session, username, "")

    def after_login(
        self, session: InstructorSession | None, _username: str, message: str
    ) -> tuple[str, Any, Any, Any]:
        """Status after the browser posted the password: (status, cleared password, case menu, editor shown)."""
        if session is None:
            status = plain(message) if message else LOGGED_OUT
            return status, gr.update(value=""), self.case_menu(None), gr.update(visible=False)
        status = f"Logged in as **{plain(session.username)}**."
        return status, gr.update(value=""), self.case_menu(session), gr.update(visible=True)

    def logout(self, session: InstructorSession | None) -> tuple[str, Any, Any]:
        if session is not None:
            self.store.logout(session)
        return LOGGED_OUT, gr.update(choices=[], value=None), gr.update(visible=False)

    @refusing(2)
    def confirm_review(self, session: InstructorSession | None, case_id: int | None) -> tuple:
        """Record that this instructor checked the picked case's pixels for burned-in text."""
        if case_id is None:
            raise UserMistake(PICK_A_CASE)
        summary = self._call(self.store.confirm_burned_in_review, session, int(case_id))
        return f"Burned-in review of case #{summary.id} recorded.", self.case_menu(session)

    @refusing(2)
    def export_audit(self, session: InstructorSession | None) -> tuple[str, list[list[Any]]]:
        """The audit log (who did what to which case, when): a CSV file and its latest AUDIT_SHOWN rows."""
        text = self._call(self.store.audit_csv, session)
        path = temp_file(EXPORT_DIR, f"audit_log_{secrets.token_hex(4)}.csv")
        path.write_text(text, encoding="utf-8")
        latest = self.store.audit_log(session, limit=AUDIT_SHOWN)
        rows = [[r.id, r.at.isoformat(timespec="seconds"), r.actor, r.action, r.case_id, r.case_slug, r.detail]
                for r in latest]  # fmt: skip
        return str(path), rows

    def case_menu(self, session: InstructorSession | None) -> Any:
        if not self.store.is_instructor(session):
            return gr.update(choices=[], value=None)
        cases = self.store.list_cases(include_unpublished=True)
        choices = [(f"#{c.id} {c.title}{'' if c.published else ' [unpublished]'}"
                    f"{' [burned-in review due]' if c.burned_in_review.blocks_publishing else ''}", c.id)
                   for c in cases]  # fmt: skip
        return gr.update(choices=choices, value=None)

    @refusing(0)
    def keep(self, file: str | None, request: gr.Request | None = None) -> None:
        """A new upload: move it out of Gradio's cache at once (see `read`), before "Read image" is pressed."""
        if file:
            self._private_copy(file, _owner(request))

    @refusing(3)
    def read(self, file: str | None, plane: str, index: float, preset: str,
             request: gr.Request | None = None) -> tuple[LoadedUpload, Any, str]:  # fmt: skip
        """Read the upload at a plane / slice / frame. Its first read moves it from Gradio's cache (where it
        could be fetched by URL) to this session's private copy, which later reads use."""
        if not file:
            raise UserMistake("Upload an image first (PNG, JPEG, DICOM or NIfTI).")
        owner = _owner(request)
        private = self._private_copy(file, owner)
        upload = self._call(read_upload, private, plane=plane, index=int(index or 0), preset=preset or None)
        upload = replace(upload, owner=owner)
        return upload, {"background": upload.rgb, "layers": [], "composite": upload.rgb}, upload.note

    def drop_upload(self, request: gr.Request | None = None) -> None:
        """The upload was cleared or the tab closed: delete this session's private copy now."""
        self.uploads.release(_owner(request))

    def _private_copy(self, file: str, owner: str) -> Path:
        try:
            return self.uploads.take(owner, file)
        except UploadGone:
            raise UserMistake(texts.ERR_UPLOAD_GONE) from None

    @refusing(2)
    def save(self, session: InstructorSession | None, case_id: int | None, upload: LoadedUpload | None,
             editor: dict | None, mask_file: str | None, publish: bool, reviewed: bool, *fields: str) -> tuple:  # fmt: skip
        """Create (case_id None) or replace a case from the form; returns (status, case menu).

        Once saved, the private copy of the raw upload is deleted (the case keeps only its pixels)."""
        if upload is None:
            raise UserMistake("Read an image first.")
        if publish and upload.needs_review and not reviewed:
            raise UserMistake(
                "This image may contain burned-in text: confirm you checked the pixels, or save unpublished."
            )
        mask = self._reference_mask(editor, mask_file, upload.rgb.shape[:2])
        draft = self._call(build_draft, CaseForm(*fields), upload, mask, published=publish)
        draft = replace(draft, burned_in_suspected=upload.needs_review, burned_in_reviewed=bool(reviewed))
        if case_id is None:
            record = self._call(self.store.create_case, session, draft)
            status = f"Created case #{record.id} ({record.summary.slug})."
        else:
            record = self._call(self.store.update_case, session, int(case_id), draft)
            status = f"Saved case #{record.id}."
        self.uploads.release(upload.owner)
        return status, self.case_menu(session)

    @refusing(2)
    def save_changes(self, session: InstructorSession | None, case_id: int | None, *args: Any) -> tuple:
        """Replace the case loaded with "Edit in the form"."""
        if case_id is None:
            raise UserMistake("Load a case with 'Edit in the form' first, or use 'Save as new case'.")
        return self.save(session, case_id, *args)

    @refusing(4 + len(CaseForm.__dataclass_fields__))
    def load(self, session: InstructorSession | None, case_id: int | None) -> tuple:
        if not self.store.is_instructor(session):
            raise UserMistake("Log in as an instructor first.")
        if case_id is None:
            raise UserMistake(PICK_A_CASE)
        case = self._call(self.store.get_case, int(case_id), session)
        image = case.images[0]
        first = image.masks[0].array() if image.masks else np.zeros((image.height, image.width), bool)
        layer = np.zeros((*first.shape, 4), np.uint8)
        layer[first] = (230, 159, 0, 255)
        upload = LoadedUpload(
            image.rgb(), image.spacing_mm, case.summary.modality, False, "Loaded from the library."
        )
        editor = {"background": upload.rgb, "layers": [layer], "composite": upload.rgb}
        return (upload, editor, upload.note, case.id, *map(str, vars(form_from_case(case)).values()))

    @refusing(2)
    def set_published(self, session: InstructorSession | None, case_id: int | None, published: bool) -> tuple:
        if case_id is None:
            raise UserMistake(PICK_A_CASE)
        summary = self._call(self.store.set_published, session, int(case_id), published)
        state = "published" if summary.published else "unpublished"
        return f"Case #{summary.id} is now {state}.", self.case_menu(session)

    @refusing(2)
    def delete(self, session: InstructorSession | None, case_id: int | None) -> tuple:
        if case_id is None:
            raise UserMistake(PICK_A_CASE)
        self._call(self.store.delete_case, session, int(case_id))
        return f"Deleted case #{case_id}.", self.case_menu(session)

    @refusing(1)
    def export_csv(self, session: InstructorSession | None) -> str:
        text = self._call(self.store.attempts_csv, session)
        path = temp_file(EXPORT_DIR, f"quiz_results_{secrets.token_hex(4)}.csv")
        return str(write_private(path, text))  # 0600: the results name students

    @staticmethod
    def _reference_mask(editor: dict | None, mask_file: str | None, size: tuple[int, int]) -> np.ndarray:
        if mask_file:
            try:
                data = Path(mask_file).read_bytes()
            except OSError:  # the error names the file: say what to do instead
                raise UserMistake("The mask file could not be read: upload it again.") from None
            mask = InstructorHandlers._call(decode_mask, data)
            if mask.shape != size:
                raise UserMistake(f"The mask file is {mask.shape[::-1]} pixels but the image is {size[::-1]}.")
            return mask
        drawn = drawn_mask(editor, size)
        if drawn is None or not drawn.any():
            raise UserMistake("Draw the reference mask with the brush, or upload a mask PNG.")
        return drawn

    @staticmethod
    def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        """fn's result; the store's refusals (not logged in, invalid data, not found...) are user mistakes."""
        try:
            return fn(*args, **kwargs)
        except CaseStoreError as error:
            raise UserMistake(str(error)) from None


def _owner(request: gr.Request | None) -> str:
    """The browser session a private upload copy belongs to ("local" for direct calls without a request)."""
    return (request.session_hash if request is not None else None) or "local"


def _form_fields() -> list[Any]:
    with gr.Row():
        title = gr.Textbox(label="Title (the diagnosis or structure)")
        modality = gr.Textbox(label="Modality")
        anatomy = gr.Textbox(label="Anatomy")
        plane = gr.Dropdown(
            [*PLANES, "en face", "coronal projection"], value="axial", label="Plane", allow_custom_value=True
        )
        difficulty = gr.Dropdown(list(DIFFICULTIES), value=DIFFICULTIES[0], label="Training level")
    vignette = gr.Textbox(label="Clinical vignette", lines=2)
    findings = gr.Textbox(label="Findings", lines=3)
    discussion = gr.Textbox(label="Discussion", lines=4)
    key_points = gr.Textbox(label="Key learning points (one per line)", lines=3)
    with gr.Row():
        tags = gr.Textbox(label="Tags (comma-separated)")
        source = gr.Textbox(label="Source")
        licence = gr.Textbox(label="Licence")
    provenance = gr.Textbox(label="Provenance (who made the image and the mask, how)", lines=2)
    mask_label = gr.Textbox(label="Reference mask label (e.g. liver lesion)")
    with gr.Row():
        closed_prompt = gr.Textbox(label="Closed question")
        closed_choices = gr.Textbox(label="Choices (comma-separated)")
        closed_answer = gr.Textbox(label="Correct choice")
    with gr.Row():
        open_prompt = gr.Textbox(label="Open question")
        open_answer = gr.Textbox(label="Reference answer")
        open_synonyms = gr.Textbox(label="Accepted synonyms (comma-separated)")
    return [title, modality, anatomy, plane, difficulty, vignette, findings, discussion, key_points, tags, source,
            provenance, licence, mask_label, closed_prompt, closed_choices, closed_answer, open_prompt, open_answer,
            open_synonyms]  # fmt: skip


def build_instructor_tab(ctx: Any) -> None:
    """Instructor UI inside the current gr.Tab; every action's session comes from the login cookie."""
    if ctx.store is None:
        gr.Markdown(NO_STORE)
        return
    settings = ctx.settings
    h = InstructorHandlers(ctx.store, PrivateUploads(parent=settings.spill_dir, max_idle_s=settings.session_ttl_s))
    gate = InstructorGate(ctx.store, hf_oauth=settings.hf_oauth, hf_allowlist=settings.instructor_allowlist)
    upload, editing = gr.State(None), gr.State(None)
    with gr.Row():
        username = gr.Textbox(label="Instructor", elem_id="instructor-user", max_length=MAX_USERNAME_CHARS)
        password = gr.Textbox(label="Password", type="password", elem_id="instructor-password")
        login, logout = gr.Button("Log in", variant="primary"), gr.Button("Log out")
    if settings.hf_oauth:
        gr.Markdown(texts.HF_SIGN_IN_NOTE)
        gr.LoginButton()
    status = gr.Markdown(LOGGED_OUT)
    editor_area = gr.Column(visible=False, elem_id="instructor-editor")  # only after a login (issue 21)
    with editor_area, gr.Accordion("Library cases", open=True):
        menu = gr.Dropdown([], label="Case (unpublished included)")
        with gr.Row():
            load, publish_btn, unpublish_btn = (
                gr.Button("Edit in the form"),
                gr.Button("Publish"),
                gr.Button("Unpublish"),
            )
            review_btn = gr.Button("Confirm burned-in review")
            delete, export = gr.Button("Delete", variant="stop"), gr.Button("Export quiz results (CSV)")
            audit = gr.Button("Export audit log (CSV)")
        csv_file = gr.File(label="Quiz results", interactive=False)
        audit_file = gr.File(label="Audit log", interactive=False)
        audit_table = gr.Dataframe(
            headers=list(AUDIT_COLUMNS), label="Latest instructor actions", interactive=False
        )
    with editor_area, gr.Accordion("New case / edit", open=True):
        with gr.Row():
            file = gr.File(
                label="Image: PNG, JPEG, DICOM or NIfTI",
                file_types=[".png", ".jpg", ".jpeg", ".dcm", ".nii", ".gz"],
            )
            plane_in = gr.Dropdown(list(PLANES), value="axial", label="NIfTI plane")
            index = gr.Number(value=0, precision=0, label="Frame / slice")
            preset = gr.Dropdown(["", "soft tissue", "lung", "liver", "bone", "brain", "auto contrast"], value="",
                                 label="CT window (blank = default)")  # fmt: skip
            read = gr.Button("Read image")
        note = gr.Markdown()
        editor = gr.ImageEditor(type="numpy", label="Draw the reference mask", sources=(), transforms=(), format="png",
                                brush=gr.Brush(colors=[BRUSH_COLOR], color_mode="fixed", default_size=8),
                                layers=gr.LayerOptions(allow_additional_layers=False, layers=["mask"]), height=420)  # fmt: skip
        mask_file = gr.File(
            label="…or upload the reference mask (PNG, image size, non-zero = inside)", file_types=[".png"]
        )
        fields = _form_fields()
        with gr.Row():
            publish = gr.Checkbox(label="Publish now")
            reviewed = gr.Checkbox(label="I checked the pixels for burned-in names, dates or IDs")
            save_new, save_edit = (
                gr.Button("Save as new case", variant="primary"),
                gr.Button("Save changes to the edited case"),
            )
    bind = gate.bind
    # Instructor events are left out of the API docs (instructors script through `python -m cases`), but stay
    # callable ("undocumented"), so the cookie check, not obscurity, is what refuses a stranger.
    hidden = {"api_visibility": "undocumented"}
    login.click(
        bind(h.after_login, 2, name="login"), [username, password], [status, password, menu, editor_area],
        js=LOGIN_JS, api_name="login", **hidden,
    )  # fmt: skip
    logout.click(bind(h.logout, 0), None, [status, menu, editor_area], js=LOGOUT_JS, api_name="logout", **hidden)
    file.upload(h.keep, file, None, api_visibility="private")  # out of Gradio's cache before "Read image"
    file.clear(h.drop_upload, None, None, api_visibility="private")
    read.click(h.read, [file, plane_in, index, preset], [upload, editor, note], api_name="read_upload", **hidden)
    root = gr.context.Context.root_block
    if root is not None:  # a closed tab deletes its private copy now
        root.unload(h.drop_upload)
    common = [upload, editor, mask_file, publish, reviewed, *fields]
    save_new.click(bind(lambda s, *a: h.save(s, None, *a), len(common)), common, [status, menu],
                   api_name="save_case", **hidden)  # fmt: skip
    save_edit.click(bind(h.save_changes, len(common) + 1), [editing, *common], [status, menu],
                    api_name="save_changes", **hidden)  # fmt: skip
    load.click(bind(h.load, 1), [menu], [upload, editor, note, editing, *fields], api_name="edit_case", **hidden)
    publish_btn.click(bind(lambda s, c: h.set_published(s, c, True), 1), [menu], [status, menu],
                      api_name="publish_case", **hidden)  # fmt: skip
    unpublish_btn.click(bind(lambda s, c: h.set_published(s, c, False), 1), [menu], [status, menu],
                        api_name="unpublish_case", **hidden)  # fmt: skip
    review_btn.click(bind(h.confirm_review, 1), [menu], [status, menu], api_name="confirm_review", **hidden)
    delete.click(bind(h.delete, 1), [menu], [status, menu], api_name="delete_case", **hidden)
    export.click(bind(h.export_csv, 0), None, csv_file, api_name="export_csv", **hidden)
    audit.click(bind(h.export_audit, 0), None, [audit_file, audit_table], api_name="export_audit", **hidden)
