"""Ask-tab additions of issue 21: whole-volume segmentation, the DICOM SEG download, save as a case draft.

Kept apart from portal/ask_tab.py: `build_ask_extras` lays out one accordion under the Ask tab and reads the
tab's `AskSession` state. The steps are plain methods of `AskExtras` (tested without a browser); the model
runs through the Engine's public `set_image` / `ask` API in the shared model queue.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from cases import CaseDraft, CaseStoreError, ImageDraft, InstructorSession, MaskDraft, QuestionDraft
from cases.records import ModelOutputDraft
from engine import imageio, processing
from engine.dicomseg import SegExportError, build_seg, series_folder, write_seg_for_display
from engine.volume import (
    SliceCache,
    VolumeError,
    VolumeMask,
    frames_result,
    iter_slice_masks,
    nifti_result,
    save_volume_mask,
    segment_label,
)
from portal import exports, texts
from portal.ask_session import AskSession
from portal.instructor_access import instructor_gate, require_instructor
from portal.instructor_auth import InstructorGate

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SourceInfo:
    """What the SEG and the 3-D mask need from the uploaded file, read once at upload.

    dicom: the pydicom header (no pixel data); nifti_affine: the file's own (4, 4) affine.
    """

    kind: str
    dicom: Any = None
    nifti_affine: np.ndarray | None = None


def read_source(path: str | None) -> SourceInfo | None:
    """Header facts of an upload (DICOM header without pixels, NIfTI affine); None for photos or nothing."""
    if not path:
        return None
    try:
        kind = imageio.sniff_kind(Path(path))
        if kind == "dicom":
            import pydicom

            return SourceInfo("dicom", dicom=pydicom.dcmread(path, stop_before_pixels=True))
        if kind == "nifti":
            import nibabel as nib

            return SourceInfo("nifti", nifti_affine=np.asarray(nib.load(path).affine, float))
    except (OSError, ValueError) as err:  # the Ask tab's own reader reports unreadable files
        logger.info("no source header for the upload: %s", err)
    return None


def export_folder() -> Path:
    root = Path(tempfile.gettempdir()) / exports.EXPORT_ROOT_NAME
    root.mkdir(exist_ok=True)
    exports.prune_exports(root, exports.EXPORT_MAX_AGE_S)
    return Path(tempfile.mkdtemp(prefix="answer-", dir=root))


class AskExtras:
    """Handlers of the accordion (engine and store from the portal context)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    # ---- DICOM SEG -------------------------------------------------------------------------------
    def seg_download(self, session: AskSession, source: SourceInfo | None) -> list[str]:
        """The last mask as DICOM SEG: on the DICOM source's grid, else over a Secondary Capture."""
        answer = session.answer
        if answer is None or answer.mask is None or session.rgb is None:
            raise gr.Error(texts.SEG_NO_MASK)
        label = segment_label(session.last_question)
        out = export_folder() / "mask-seg.dcm"
        name = self.ctx.engine.info.name
        try:
            if source is not None and source.dicom is not None:
                seg = build_seg([source.dicom], self._frame_stack(session, source, answer.mask), label, name)
                seg.save_as(out)
                return [str(out)]
            spacing = imageio.frame_spacing(session.image, session.plane) if session.image else None
            files = write_seg_for_display(session.rgb, answer.mask, out, label=label, spacing_mm=spacing,
                                          model_name=name)  # fmt: skip
        except SegExportError as err:
            raise gr.Error(str(err)) from err
        return [str(files.seg), str(files.secondary_capture)]

    @staticmethod
    def _frame_stack(session: AskSession, source: SourceInfo, mask: np.ndarray) -> np.ndarray:
        frames = int(source.dicom.get("NumberOfFrames", 1) or 1)
        if frames == 1:
            return mask
        stack = np.zeros((frames, *mask.shape), bool)
        stack[session.index] = mask
        return stack

    # ---- whole volume ----------------------------------------------------------------------------
    def segment_volume(
        self, session: AskSession, source: SourceInfo | None, question: str, cache: SliceCache | None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects the tracker here
    ) -> Iterator[tuple]:  # fmt: skip
        """Yield (status, files, cache) after every slice, so the Cancel button stops it between slices."""
        image = session.image
        if image is None or imageio.n_slices(image, session.plane) < 2:
            raise gr.Error(texts.VOLUME_NEEDS_VOLUME)
        text = (question or "").strip() or session.last_question
        if not text:
            raise gr.Error(texts.VOLUME_NEEDS_QUESTION)
        cache = cache or SliceCache(texts.VOLUME_CACHE_ENTRIES)
        is_nifti = image.kind == "nifti"
        plane = session.plane if is_nifti else "axial"
        n = imageio.n_slices(image, plane)
        masks: list[np.ndarray] = []
        start = time.perf_counter()
        slices = iter_slice_masks(self.ctx.engine, n, lambda i: imageio.to_rgb(image, i, plane), text,
                                  key=(id(image), plane), cache=cache)  # fmt: skip
        for index, mask in slices:
            masks.append(mask)
            status = texts.VOLUME_PROGRESS.format(plane=plane if is_nifti else "frame", done=index + 1, total=n)
            progress((index + 1, n), desc=status)
            yield status, None, cache
        per_slice = (time.perf_counter() - start) / n
        if is_nifti:
            affine = source.nifti_affine if source and source.nifti_affine is not None else image.affine
            result = nifti_result(masks, image.volume.shape[:3], affine, plane, text, per_slice)
        else:
            result = frames_result(masks, per_slice, source.dicom if source else None, text)
        yield volume_summary(result), self._save_volume(result, source, image), cache

    def _save_volume(self, result: VolumeMask, source: SourceInfo | None, image: Any = None) -> list[str]:
        folder = export_folder()
        files = [save_volume_mask(result, folder / "volume-mask.nii.gz")]
        name = self.ctx.engine.info.name
        if source is not None and source.dicom is not None:
            files.append(save_volume_mask(result, folder / "volume-seg.dcm", sources=[source.dicom], model_name=name))
        elif image is not None and result.affine is not None:  # NIfTI: the SEG and its SC series, one zip
            try:
                seg = save_volume_mask(result, folder / "volume-seg.dcm", image=image, model_name=name)
                files.append(zip_with_series(seg, folder / texts.VOLUME_SEG_ZIP))
            except (VolumeError, SegExportError) as err:
                gr.Warning(str(err))
        return [str(f) for f in files]

    # ---- save as a case draft --------------------------------------------------------------------
    def save_draft(self, instructor: InstructorSession | None, session: AskSession, title: str) -> str:
        """The explored image, region, question, model answer and mask as an unpublished case (instructor).

        `instructor` is the session `InstructorGate.bind` read from the request's login cookie.
        """
        store = self.ctx.store
        try:
            who = require_instructor(store, instructor, texts.DRAFT_NEEDS_LOGIN)
            draft = draft_from_session(session, title, who.username, self.ctx.engine.info.name)
            record = store.create_case(who, draft)
        except CaseStoreError as err:
            raise gr.Error(str(err)) from err
        return texts.DRAFT_SAVED.format(id=record.id, slug=record.summary.slug)


def zip_with_series(seg: Path, out: Path) -> Path:
    """A zip of the SEG and the Secondary Capture series folder written beside it (kept as a folder inside)."""
    import zipfile

    folder = series_folder(seg)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(seg, seg.name)
        for part in sorted(folder.iterdir()):
            archive.write(part, f"{folder.name}/{part.name}")
    return out


def volume_summary(result: VolumeMask) -> str:
    volume = texts.VOLUME_UNKNOWN_ML if result.volume_ml is None else f"{result.volume_ml:,.2f} mL"
    return texts.VOLUME_DONE.format(
        label=result.label, voxels=int(result.mask.sum()), with_mask=result.slices_with_mask, n=result.n_slices,
        volume=volume, per_slice=result.seconds_per_slice, shape="×".join(str(s) for s in result.mask.shape),
    )  # fmt: skip


def draft_from_session(session: AskSession, title: str, username: str, model_name: str) -> CaseDraft:
    """A CaseDraft (unpublished) of the Ask tab's last answer: image, region, question, answer, mask."""
    answer, image, rgb = session.answer, session.image, session.rgb
    if answer is None or image is None or rgb is None:
        raise CaseStoreError(texts.DRAFT_NEEDS_ANSWER)
    label = segment_label(session.last_question)
    region = _region_mask(session.last_region, rgb.shape[:2])
    masks = () if answer.mask is None or not answer.mask.any() else (MaskDraft(label, answer.mask),)
    output = ModelOutputDraft(model_id=model_name, revision=None, parameters={}, answer=answer.text,
                              mask=answer.mask, created_at=_now())  # fmt: skip
    question = (
        QuestionDraft("segmentation", session.last_question, label, target_label=label, region=region,
                      model_outputs=(output,))
        if masks
        else QuestionDraft("open", session.last_question, answer.text or "(to write)", region=region,
                           model_outputs=(output,))
    )  # fmt: skip
    return CaseDraft(
        title=(title or "").strip() or f"Draft: {session.last_question[:80]}", modality=image.modality or image.kind,
        anatomy="unspecified", plane=session.plane if image.kind == "nifti" else "unspecified",
        difficulty="medical student", vignette="", findings="", discussion="", key_points=(), tags=("draft",),
        source="Ask tab", provenance=f"Saved from the Ask tab by {username}; the mask is the model's ({model_name}).",
        licence=texts.DRAFT_LICENCE, published=False,
        images=(ImageDraft(rgb, masks, imageio.frame_spacing(image, session.plane), "from the Ask tab"),),
        questions=(question,),
    )  # fmt: skip


def _region_mask(region: dict[str, Any] | None, shape: tuple[int, int]) -> np.ndarray | None:
    """The point / box region of the last question as an (H, W) bool mask (a sketch's strokes are not kept)."""
    if not region or region.get("kind") not in ("point", "box"):
        return None
    x1, y1, x2, y2 = (int(v) for v in region["xyxy"])
    if region["kind"] == "point":
        return processing.point_mask((x1 + x2) // 2, (y1 + y2) // 2, shape)
    return processing.box_mask(x1, y1, x2, y2, shape)


def _now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def build_ask_extras(ctx: Any, ask_session: gr.State, upload: gr.File, question: gr.Textbox,
                     gate: InstructorGate | None = None) -> None:  # fmt: skip
    """The accordion under the Ask tab; "save as a case draft" (with a case store) takes its instructor
    from `gate`, the login cookie (built from the context when not given)."""
    x = AskExtras(ctx)
    source, cache = gr.State(None), gr.State(None)
    with gr.Accordion(texts.EXTRAS_TITLE, open=False, elem_id="ask-extras"):
        with gr.Row():
            seg_button = gr.Button(texts.SEG_BUTTON, elem_id="ask-seg-button")
            volume_button = gr.Button(texts.VOLUME_BUTTON, variant="primary", elem_id="ask-volume-button")
            cancel = gr.Button(texts.VOLUME_CANCEL, elem_id="ask-volume-cancel")
        volume_note = gr.Markdown(elem_id="ask-volume-note")
        with gr.Row():
            seg_files = gr.File(label=texts.SEG_FILES_LABEL, file_count="multiple", interactive=False)
            volume_files = gr.File(label=texts.VOLUME_FILES_LABEL, file_count="multiple", interactive=False)
        with gr.Row(visible=ctx.store is not None):
            title = gr.Textbox(label=texts.DRAFT_TITLE_LABEL, scale=3, elem_id="ask-draft-title")
            save = gr.Button(texts.DRAFT_BUTTON, scale=1, elem_id="ask-draft-button")
        draft_note = gr.Markdown(elem_id="ask-draft-note")
    private = {"api_visibility": "private"}
    upload.change(read_source, upload, source, **private)
    seg_button.click(x.seg_download, [ask_session, source], seg_files, api_name="mask_dicom_seg")
    run = volume_button.click(x.segment_volume, [ask_session, source, question, cache],
                              [volume_note, volume_files, cache], api_name="segment_volume",
                              **ctx.model_queue())  # fmt: skip
    cancel.click(None, None, None, cancels=[run], **private)
    gate = gate or instructor_gate(ctx)
    if gate is not None:  # the instructor comes from the login cookie, never from the session_hash's state
        saver = gate.bind(x.save_draft, 2, name="save_case_draft", params=("ask_session", "title"))
        save.click(saver, [ask_session, title], draft_note, api_name="save_case_draft")
