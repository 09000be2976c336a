"""Frozen dataclasses that leave the case store (never ORM objects) and drafts that go into it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cases.imaging import decode_mask, decode_rgb
from cases.marking import AnswerKey

QUESTION_KINDS = ("closed", "open", "segmentation")
DIFFICULTIES = ("medical student", "resident", "specialist")


@dataclass(frozen=True)
class MaskRecord:
    """A labelled reference mask; `png` decodes to an (H, W) bool mask at its image's size."""

    id: int
    label: str
    png: bytes

    def array(self) -> np.ndarray:
        return decode_mask(self.png)


@dataclass(frozen=True)
class ImageRecord:
    """A key image: `png` decodes to (H, W, 3) uint8 RGB; spacing in mm per (row, column) or None."""

    id: int
    position: int
    description: str
    png: bytes
    width: int
    height: int
    spacing_mm: tuple[float, float] | None
    masks: tuple[MaskRecord, ...]

    def rgb(self) -> np.ndarray:
        return decode_rgb(self.png)

    def mask(self, label: str) -> MaskRecord:
        """The reference mask with this label (KeyError names the labels that exist)."""
        for mask in self.masks:
            if mask.label == label:
                return mask
        raise KeyError(f"image {self.id} has no mask {label!r}; it has {[m.label for m in self.masks]}")


@dataclass(frozen=True)
class QuestionRecord:
    """A curated question. kind: closed (pick one of `choices`), open (free text), segmentation (draw)."""

    id: int
    case_id: int
    position: int
    kind: str
    prompt: str
    reference_answer: str
    synonyms: tuple[str, ...]
    choices: tuple[str, ...]
    target_label: str | None
    region_png: bytes | None
    answer_key: AnswerKey | None = None  # the instructor's key; None = reference and synonyms only

    def key(self) -> AnswerKey:
        """The key answers are marked with (the stored key, else the reference answer and synonyms)."""
        return self.answer_key or AnswerKey.simple(self.reference_answer, self.synonyms)


@dataclass(frozen=True)
class BurnedInReview:
    """Whether a case's image may hold burned-in text, and who confirmed the pixels were checked, when."""

    required: bool
    reviewed_by: str | None
    reviewed_at: dt.datetime | None

    @property
    def blocks_publishing(self) -> bool:
        return self.required and self.reviewed_by is None


@dataclass(frozen=True)
class AuditRecord:
    """One instructor action: who, what, which case (id and slug at the time), when, and a detail."""

    id: int
    at: dt.datetime
    actor: str
    action: str
    case_id: int | None
    case_slug: str | None
    detail: str


@dataclass(frozen=True)
class CaseSummary:
    """One row of the library list."""

    id: int
    slug: str
    title: str
    modality: str
    anatomy: str
    plane: str
    difficulty: str
    tags: tuple[str, ...]
    n_images: int
    n_masks: int
    n_questions: int
    published: bool
    burned_in_review: BurnedInReview = field(default_factory=lambda: BurnedInReview(False, None, None))


@dataclass(frozen=True)
class CaseRecord:
    """A full case with its images, masks and questions."""

    summary: CaseSummary
    vignette: str
    findings: str
    discussion: str
    key_points: tuple[str, ...]
    window_preset: str | None
    source: str
    provenance: str
    licence: str
    synthetic: bool
    images: tuple[ImageRecord, ...]
    questions: tuple[QuestionRecord, ...]

    @property
    def id(self) -> int:
        return self.summary.id

    @property
    def title(self) -> str:
        return self.summary.title

    def question(self, question_id: int) -> QuestionRecord:
        for question in self.questions:
            if question.id == question_id:
                return question
        raise KeyError(f"case {self.id} has no question {question_id}")


@dataclass(frozen=True)
class ModelOutputRecord:
    """A cached model answer (and mask PNG, when the model produced `<SEG>`) for one question."""

    id: int
    question_id: int
    model_id: str
    revision: str | None
    parameters: Mapping[str, Any]
    answer: str
    mask_png: bytes | None
    created_at: dt.datetime

    def mask(self) -> np.ndarray | None:
        return None if self.mask_png is None else decode_mask(self.mask_png)


@dataclass(frozen=True)
class AttemptRecord:
    """A scored quiz attempt. dice/iou are None for questions without a reference mask."""

    id: int
    question_id: int
    case_id: int
    student: str
    answer: str
    correct: bool | None
    dice: float | None
    iou: float | None
    duration_s: float | None
    created_at: dt.datetime
    verdict: str | None = None  # cases.marking.VERDICTS for answered questions, None for drawings


@dataclass(frozen=True)
class InstructorSession:
    """Proof of an instructor login, issued by `CaseStore.login`; the store checks the token."""

    username: str
    token: str = field(repr=False)
    expires_at: dt.datetime


@dataclass(frozen=True)
class MaskDraft:
    """A labelled reference mask to store: (H, W) bool (non-zero = inside) at the image size."""

    label: str
    mask: np.ndarray


@dataclass(frozen=True)
class ImageDraft:
    """An image to store: (H, W[, 3|4]) uint8 pixels, optional (row, col) spacing in mm, and masks."""

    pixels: np.ndarray
    masks: tuple[MaskDraft, ...] = ()
    spacing_mm: tuple[float, float] | None = None
    description: str = ""


@dataclass(frozen=True)
class ModelOutputDraft:
    """A cached model output carried by a draft (import of an archive); mask (H, W) bool or None."""

    model_id: str
    revision: str | None
    parameters: Mapping[str, Any]
    answer: str
    mask: np.ndarray | None
    created_at: dt.datetime


@dataclass(frozen=True)
class QuestionDraft:
    """A question to store; segmentation questions name the `target_label` of a reference mask."""

    kind: str
    prompt: str
    reference_answer: str
    synonyms: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    target_label: str | None = None
    region: np.ndarray | None = None  # optional (H, W) bool region prompt at the first image's size
    answer_key: AnswerKey | None = None  # open questions: accepted answers, concepts, known wrong answers
    model_outputs: tuple[ModelOutputDraft, ...] = ()


@dataclass(frozen=True)
class CaseDraft:
    """Everything needed to create (or fully replace) a case."""

    title: str
    modality: str
    anatomy: str
    plane: str
    difficulty: str
    vignette: str
    findings: str
    discussion: str
    key_points: tuple[str, ...]
    tags: tuple[str, ...]
    source: str
    provenance: str
    licence: str
    images: tuple[ImageDraft, ...]
    questions: tuple[QuestionDraft, ...]
    window_preset: str | None = None
    synthetic: bool = False
    published: bool = False
    slug: str | None = None  # derived from the title when None
    burned_in_suspected: bool = False  # de-identification could not rule out burned-in text in the pixels
    burned_in_reviewed: bool = False  # the instructor saving the draft confirms the pixels were checked
