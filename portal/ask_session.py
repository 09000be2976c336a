"""The Ask tab's per-user state and the steps behind its handlers, without any gradio component.

An AskSession is kept in a `gr.State`. It is immutable: every step returns a new one. It holds the loaded
file, the view (frame / plane / window), the RGB image the model receives, region marks, the engine's image
handle (so the image is encoded once and reused across turns), the conversation and the last answer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine import imageio, processing
from engine.conversation import REGION_SEGMENT_QUESTION
from engine.imageio import LoadedImage
from engine.results import Answer, GenerationSettings
from portal import overlay, texts
from portal.regions import Mark, RegionMarks
from portal.safe_text import plain
from portal.session_memory import nbytes_of


class UserInputError(ValueError):
    """A problem with what the user did; the message is shown to them as is."""


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields; gradio only needs identity
class AskSession:
    image: LoadedImage | None = None
    index: int = 0  # frame (DICOM) or slice (NIfTI)
    plane: str = "axial"
    preset: str | None = None  # None: the default window for the modality
    rgb: np.ndarray | None = None  # (H, W, 3) uint8: exactly what the model receives
    marks: RegionMarks = field(default_factory=RegionMarks)
    handle: Any = None  # engine.set_image(rgb), made on the first question
    history: tuple[tuple[str, str], ...] = ()
    answer: Answer | None = None
    last_question: str = ""
    last_region: dict[str, Any] | None = None
    last_settings: GenerationSettings | None = None
    mask_areas: tuple[int | None, ...] = ()  # per turn of `history`: mask pixels, None without a mask
    note: str = ""  # what the reader changed about the file (4-D NIfTI, transparency), shown with the image

    @property
    def has_image(self) -> bool:
        return self.rgb is not None


# ------------------------------------------------------------------------------------------- the image


def load(path: str | Path, spill_dir: Path | None = None) -> AskSession:
    """Read an uploaded file and show its middle slice or frame. Raises ImageReadError or UserInputError.

    spill_dir: where large volumes are memory-mapped from (engine.imageio.read_image).
    """
    image = imageio.read_image(path, spill_dir=spill_dir)
    _check_shape(image)
    image, note = _flatten_transparency(image, Path(path))
    note = " ".join(n for n in (note, _four_d_note(image, Path(path))) if n)
    index = imageio.default_index(image, "axial")  # the CLI's default too
    return replace(with_view(AskSession(image=image), index=index, plane="axial", preset=None), note=note)


def _check_shape(image: LoadedImage) -> None:
    """Refuse images too small or too elongated to preview or ask about (UserInputError says why)."""
    frame = imageio.get_frame(image, 0) if image.kind != "nifti" else image.volume[:, :, 0]
    h, w = frame.shape[:2]
    if min(h, w) < texts.MIN_IMAGE_SIDE:
        raise UserInputError(texts.ERR_IMAGE_TOO_SMALL.format(w=w, h=h, side=texts.MIN_IMAGE_SIDE))
    if max(h, w) / min(h, w) > texts.MAX_ASPECT_RATIO:
        raise UserInputError(
            texts.ERR_IMAGE_ASPECT.format(w=w, h=h, ratio=max(h, w) / min(h, w), limit=texts.MAX_ASPECT_RATIO)
        )


def _flatten_transparency(image: LoadedImage, path: Path) -> tuple[LoadedImage, str]:
    """Photos with an alpha channel: transparent pixels become black (not their hidden colour), with a note."""
    if image.kind != "photo" or image.volume.ndim != 4:
        return image, ""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if "A" not in im.getbands() and "transparency" not in im.info:
                return image, ""
            alpha = np.asarray(im.convert("RGBA"), dtype=np.float32)[..., 3:] / 255.0
    except OSError:
        return image, ""
    if alpha.shape[:2] != image.volume.shape[1:3] or alpha.min() >= 1.0:
        return image, ""
    flat = np.rint(image.volume[0].astype(np.float32) * alpha).astype(np.uint8)
    return dataclasses.replace(image, volume=flat[None]), texts.RGBA_NOTE.format(share=float((alpha < 1).mean()))


def _four_d_note(image: LoadedImage, path: Path) -> str:
    if image.kind != "nifti":
        return ""
    import nibabel as nib

    shape = nib.load(str(path)).shape
    return texts.NIFTI_4D_NOTE.format(n=shape[3]) if len(shape) == 4 and shape[3] > 1 else ""


def with_view(session: AskSession, *, index: int, plane: str, preset: str | None) -> AskSession:
    """A new view of the same file: the image changes, so marks, handle and conversation start afresh."""
    image = session.image
    if image is None:
        raise UserInputError(texts.ERR_NO_IMAGE)
    index = int(np.clip(index, 0, imageio.n_slices(image, plane) - 1))
    rgb = imageio.to_rgb(image, index, plane, preset)
    return AskSession(image=image, index=index, plane=plane, preset=preset, rgb=rgb, note=session.note)


def memory_bytes(session: AskSession) -> int:
    """Bytes this session keeps in memory: the decoded image (0 when memory-mapped), the RGB view, the
    engine's image embeddings and the last mask."""
    mask = session.answer.mask if session.answer is not None else None
    return nbytes_of(session.image, session.rgb, session.handle, mask)


def window_choice(session: AskSession) -> str:
    """The name of the window shown (for the dropdown)."""
    if session.preset is not None:
        return session.preset
    return imageio.DEFAULT_CT_PRESET if session.image is not None and session.image.is_ct else imageio.AUTO


def describe(session: AskSession) -> str:
    """One line about the loaded image: kind, modality, size, spacing, frame."""
    image, rgb = session.image, session.rgb
    if image is None or rgb is None:
        return texts.ERR_NO_IMAGE
    parts = [image.kind.upper() if image.kind != "photo" else "Image", plain(image.modality or "")]
    parts.append(f"{rgb.shape[1]}×{rgb.shape[0]} px")
    spacing = imageio.frame_spacing(image, session.plane)
    if spacing:
        parts.append(f"pixel {spacing[0]:.3g} × {spacing[1]:.3g} mm")
    count = imageio.n_slices(image, session.plane)
    if count > 1:
        where = f"{session.plane} slice" if image.kind == "nifti" else "frame"
        parts.append(f"{where} {session.index + 1}/{count}")
    line = " · ".join(p for p in parts if p)
    return f"{line}\n\n{session.note}" if session.note else line


def model_input(session: AskSession) -> np.ndarray | None:
    """(336, 336, 3) uint8: the padded image the CLIP branch sees, or None without an image."""
    return None if session.rgb is None else overlay.model_input_view(session.rgb)


# ----------------------------------------------------------------------------------------------- regions


def click(session: AskSession, tool: str, x: int, y: int) -> AskSession:
    """Record a click at image pixel (x, y) with the current tool. Raises UserInputError outside the image."""
    if session.rgb is None:
        raise UserInputError(texts.ERR_NO_IMAGE)
    h, w = session.rgb.shape[:2]
    if not (0 <= x < w and 0 <= y < h):
        raise UserInputError(texts.ERR_OUTSIDE.format(x=x, y=y, w=w, h=h))
    return replace(session, marks=session.marks.click(tool, int(x), int(y)))


def preview(session: AskSession) -> np.ndarray | None:
    """The current image with the region marks drawn on it."""
    if session.rgb is None:
        return None
    return overlay.draw_marks(session.rgb, session.marks.marks, session.marks.pending)


def sketch_mask(editor_value: dict[str, Any] | None, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool union of the ImageEditor's brush layers (alpha > 0). Raises UserInputError when empty."""
    layers = [] if not editor_value else [np.asarray(layer) for layer in editor_value.get("layers") or []]
    layers = [layer for layer in layers if layer.ndim == 3 and layer.shape[2] == 4]
    if not layers:
        raise UserInputError(texts.ERR_EMPTY_SKETCH)
    if any(layer.shape[:2] != shape for layer in layers):
        raise UserInputError(texts.ERR_SKETCH_SIZE)
    mask = np.any([layer[..., 3] > 0 for layer in layers], axis=0)
    if not mask.any():
        raise UserInputError(texts.ERR_EMPTY_SKETCH)
    return mask


def mark_mask(mark: Mark, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool region mask of a click mark: MedPLIB's 41×41 point square or a filled box."""
    if mark.kind == "point":
        return processing.point_mask(*mark.point, shape)
    try:
        return processing.box_mask(*mark.xyxy, shape)
    except ValueError as err:  # a box with no area
        raise UserInputError(f"{err}. Press Undo and click two corners further apart.") from err


def region_for(
    session: AskSession, tool: str, editor_value: dict[str, Any] | None
) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """The region mask for this question and a description for the record, or (None, None)."""
    if tool == "None" or session.rgb is None:
        return None, None
    shape = session.rgb.shape[:2]
    if tool == "Sketch":
        mask = processing.sketch_mask(sketch_mask(editor_value, shape))
        return mask, {"kind": "sketch", "pixels": int(mask.sum())}
    if session.marks.pending is not None:
        raise UserInputError(texts.ERR_HALF_BOX)
    mark: Mark | None = session.marks.active
    if mark is None:
        raise UserInputError(texts.ERR_NO_MARK.format(tool=tool.lower()))
    return mark_mask(mark, shape), {"kind": mark.kind, "xyxy": list(mark.xyxy)}


def region_note(session: AskSession, tool: str, editor_value: dict[str, Any] | None) -> str:
    """The line under the image: the region the next question will really send, decided as `region_for` does.

    Point / Box send the last clicked mark, Sketch sends the brush strokes (never a clicked mark), None sends
    nothing (clicked marks are kept for later).
    """
    if session.rgb is None:
        return texts.NOTE_NO_MARK
    if tool == "Sketch":
        try:
            pixels = int(sketch_mask(editor_value, session.rgb.shape[:2]).sum())
        except UserInputError:
            return texts.NOTE_EMPTY_SKETCH
        return texts.NOTE_ACTIVE_SKETCH.format(pixels=pixels)
    if session.marks.pending is not None and tool == "Box":
        return texts.NOTE_FIRST_CORNER.format(x=session.marks.pending[0], y=session.marks.pending[1])
    mark = session.marks.active
    if tool not in ("Point", "Box"):
        kept = "" if mark is None else texts.NOTE_MARK_KEPT.format(kind=mark.kind, where=_where(mark))
        return texts.NOTE_TOOL_NONE + kept
    if mark is None:
        return texts.NOTE_NO_MARK
    return texts.NOTE_ACTIVE_MARK.format(kind=mark.kind, where=_where(mark))


def _where(mark: Mark) -> list[int]:
    return list(mark.xyxy) if mark.kind == "box" else list(mark.point)


# --------------------------------------------------------------------------------------------- questions


def prepare_question(question: str | None, has_region: bool, max_chars: int) -> str:
    """Trim and check the question; add `<region>` when a region is marked but not named."""
    text = (question or "").strip()
    if not text or text == texts.REGION_TOKEN:
        raise UserInputError(texts.ERR_EMPTY_QUESTION)
    if len(text) > max_chars:
        raise UserInputError(texts.ERR_LONG_QUESTION.format(n=len(text), limit=max_chars))
    if texts.REGION_TOKEN in text and not has_region:
        raise UserInputError(texts.ERR_REGION_TAG)
    if has_region and texts.REGION_TOKEN not in text:
        text = f"{text} {texts.REGION_TOKEN}"
    return text


def segment_request(session: AskSession, question: str | None, tool: str) -> tuple[str, str | None]:
    """(question, forced answer) of the Segment button. A typed question is asked with the answer forced to
    `<SEG>`. With an empty box and a region tool chosen it asks `REGION_SEGMENT_QUESTION` unforced, so the model
    may answer with the mask of the structure under the region or say that there is none; otherwise it asks the
    last question of the conversation again (may be ""), forced to `<SEG>`."""
    typed = (question or "").strip()
    if not typed and tool != "None" and session.rgb is not None:
        return REGION_SEGMENT_QUESTION, None
    return typed or session.last_question, texts.SEG_FORCE_ANSWER


def with_handle(session: AskSession, engine: Any) -> AskSession:
    """Encode the image once (engine.set_image); later turns reuse the handle."""
    if session.rgb is None:
        raise UserInputError(texts.ERR_NO_IMAGE)
    if session.handle is not None:
        return session
    return replace(session, handle=engine.set_image(session.rgb))


def after_answer(
    session: AskSession,
    question: str,
    answer: Answer,
    region: dict[str, Any] | None,
    settings: GenerationSettings,
) -> AskSession:
    return replace(
        session,
        history=session.history + ((question, answer.text),),
        mask_areas=session.mask_areas + (answer.mask_area if answer.has_mask else None,),
        answer=answer,
        last_question=question,
        last_region=region,
        last_settings=settings,
    )


def new_conversation(session: AskSession) -> AskSession:
    return replace(session, history=(), mask_areas=(), answer=None, last_question="", last_region=None,
                   last_settings=None)  # fmt: skip


# ----------------------------------------------------------------------------------------------- outputs


def mask_overlay(session: AskSession, opacity: float, style: str, color_name: str) -> np.ndarray | None:
    """The last answer's mask over the image, or None without a mask."""
    answer = session.answer
    if session.rgb is None or answer is None or answer.mask is None:
        return None
    color = texts.MASK_COLORS.get(color_name, texts.MASK_COLORS["orange"])
    return overlay.overlay_mask(session.rgb, answer.mask, color=color, opacity=opacity, style=style)


def mask_summary(session: AskSession) -> str:
    """Mask area in pixels (and mm² when the pixel spacing is known), or the no-mask notice."""
    answer = session.answer
    if answer is None:
        return ""
    if answer.mask is None:
        return texts.NO_MASK_NOTICE
    pixels = answer.mask_area
    if pixels == 0:
        return texts.EMPTY_MASK_NOTICE
    spacing = imageio.frame_spacing(session.image, session.plane) if session.image else None
    area = texts.count_noun(pixels, "pixel")
    if spacing is None:
        return texts.MASK_AREA.format(area=area)
    row, col = spacing
    return texts.MASK_AREA_MM.format(area=area, mm2=pixels * row * col, row=row, col=col)


def record(session: AskSession, model_info: Any, created: str) -> dict[str, Any]:
    """The JSON record of the last answer: prompt, answer, model and parameters (no file names)."""
    answer, image = session.answer, session.image
    if answer is None or image is None or session.rgb is None:
        raise UserInputError(texts.ERR_NO_ANSWER)
    return {
        "created_utc": created,
        "question": session.last_question,
        "region": session.last_region,
        "answer": answer.text,
        "token_ids": list(answer.token_ids),
        "has_mask": answer.has_mask,
        "mask_area_pixels": answer.mask_area,
        "history": [list(turn) for turn in session.history[:-1]],
        "image": {
            "kind": image.kind,
            "modality": image.modality,
            "size_hw": list(session.rgb.shape[:2]),
            "index": session.index,
            "plane": session.plane if image.kind == "nifti" else None,
            "window": window_choice(session),
            "pixel_spacing_mm": imageio.frame_spacing(image, session.plane),
        },
        "model": dataclasses.asdict(model_info) if dataclasses.is_dataclass(model_info) else str(model_info),
        "settings": dataclasses.asdict(session.last_settings) if session.last_settings else None,
        "timings_ms": dict(answer.timings_ms),
    }
