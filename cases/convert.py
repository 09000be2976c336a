"""Conversions between drafts, ORM rows and frozen records, with the validation of drafts.

Nothing here opens a transaction: `cases.store` calls these inside its own short transactions.
"""

from __future__ import annotations

import csv
import io
import re
import secrets
from collections.abc import Mapping, Sequence

import numpy as np

from cases.errors import InvalidCaseData
from cases.imaging import encode_mask_png, encode_png, to_rgb
from cases.marking import AnswerKey
from cases.models import AnswerKeyRow, Attempt, AuditEntry, Case, Image, Mask, ModelOutput, Question
from cases.records import (
    DIFFICULTIES,
    QUESTION_KINDS,
    AttemptRecord,
    AuditRecord,
    BurnedInReview,
    CaseDraft,
    CaseRecord,
    CaseSummary,
    ImageDraft,
    ImageRecord,
    MaskRecord,
    ModelOutputDraft,
    ModelOutputRecord,
    QuestionDraft,
    QuestionRecord,
)

MAX_TEXT_CHARS = 20_000  # per teaching-text field
MAX_IMAGES_PER_CASE = 8
SLUG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,119}$")
REQUIRED_TEXT = ("title", "modality", "anatomy", "plane", "source", "provenance", "licence")
CASE_FIELDS = (
    "title", "modality", "anatomy", "plane", "difficulty", "vignette", "findings", "discussion",
    "key_points", "tags", "window_preset", "source", "provenance", "licence", "synthetic", "published",
)  # fmt: skip


REVIEW_FIELDS = ("burned_in_review_required", "burned_in_reviewed_by", "burned_in_reviewed_at")


def slugify(title: str) -> str:
    """'Brain MRI: white matter' → 'brain-mri-white-matter-3f9a' (random suffix keeps slugs unique)."""
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:100] or "case"
    return f"{base}-{secrets.token_hex(2)}"


def case_row(draft: CaseDraft) -> Case:
    """Validate a draft and build its ORM rows (not yet added to any session)."""
    _check_draft_text(draft)
    if not 1 <= len(draft.images) <= MAX_IMAGES_PER_CASE:
        raise InvalidCaseData(f"a case needs 1 to {MAX_IMAGES_PER_CASE} images, got {len(draft.images)}")
    images = [_image_row(position, image) for position, image in enumerate(draft.images)]
    first_size = (images[0].height, images[0].width)
    labels = {mask.label for mask in images[0].masks}
    questions = [
        _question_row(position, question, labels, first_size)
        for position, question in enumerate(draft.questions)
    ]
    slug = draft.slug or slugify(draft.title)
    if not SLUG_PATTERN.match(slug):
        raise InvalidCaseData(f"slug {slug!r} must be lower-case letters, digits and '-' (max 120)")
    return Case(
        slug=slug,
        **{name: getattr(draft, name) for name in CASE_FIELDS if name not in ("key_points", "tags")},
        key_points=list(draft.key_points),
        tags=list(draft.tags),
        images=images,
        questions=questions,
        burned_in_review_required=bool(draft.burned_in_suspected),
        burned_in_reviewed_by=None,
        burned_in_reviewed_at=None,
    )


def _check_draft_text(draft: CaseDraft) -> None:
    for name in REQUIRED_TEXT:
        if not str(getattr(draft, name)).strip():
            raise InvalidCaseData(f"case field {name!r} is empty; every case needs it")
    if draft.difficulty not in DIFFICULTIES:
        raise InvalidCaseData(f"difficulty must be one of {DIFFICULTIES}, got {draft.difficulty!r}")
    texts = (draft.vignette, draft.findings, draft.discussion, *draft.key_points, *draft.tags)
    if any(len(text) > MAX_TEXT_CHARS for text in texts):
        raise InvalidCaseData(f"teaching text fields are limited to {MAX_TEXT_CHARS} characters")


def _image_row(position: int, draft: ImageDraft) -> Image:
    rgb = to_rgb(draft.pixels)
    height, width = rgb.shape[:2]
    masks = []
    for mask in draft.masks:
        if np.asarray(mask.mask).shape != (height, width):
            raise InvalidCaseData(
                f"mask {mask.label!r} is {np.asarray(mask.mask).shape}, image {position} is {(height, width)}: "
                "masks must have the image's size"
            )
        if not mask.label.strip():
            raise InvalidCaseData("every mask needs a label (e.g. 'liver')")
        masks.append(Mask(label=mask.label.strip(), png=encode_mask_png(mask.mask)))
    if len({m.label for m in masks}) != len(masks):
        raise InvalidCaseData(f"image {position} has two masks with the same label")
    spacing = _check_spacing(draft.spacing_mm)
    return Image(
        position=position,
        description=draft.description,
        png=encode_png(rgb),
        width=width,
        height=height,
        spacing_row_mm=None if spacing is None else spacing[0],
        spacing_col_mm=None if spacing is None else spacing[1],
        masks=masks,
    )


def _check_spacing(spacing: tuple[float, float] | None) -> tuple[float, float] | None:
    if spacing is None:
        return None
    values = tuple(float(v) for v in spacing)
    if len(values) != 2 or not all(0 < v < 100 for v in values):
        raise InvalidCaseData(f"pixel spacing must be two positive mm values (row, column), got {spacing}")
    return values  # type: ignore[return-value]


def _question_row(position: int, draft: QuestionDraft, labels: set[str], size: tuple[int, int]) -> Question:
    if draft.kind not in QUESTION_KINDS:
        raise InvalidCaseData(f"question kind must be one of {QUESTION_KINDS}, got {draft.kind!r}")
    if not draft.prompt.strip():
        raise InvalidCaseData(f"question {position} has an empty prompt")
    if draft.kind == "closed" and draft.reference_answer not in draft.choices:
        raise InvalidCaseData(f"closed question {position}: the reference answer must be one of its choices")
    if draft.kind == "segmentation" and draft.target_label not in labels:
        raise InvalidCaseData(
            f"segmentation question {position} targets {draft.target_label!r}; the first image has {sorted(labels)}"
        )
    if draft.region is not None and np.asarray(draft.region).shape != size:
        raise InvalidCaseData(f"question {position}: the region mask must be {size}")
    return Question(
        position=position,
        kind=draft.kind,
        prompt=draft.prompt,
        reference_answer=draft.reference_answer,
        synonyms=list(draft.synonyms),
        choices=list(draft.choices),
        target_label=draft.target_label,
        region_png=None if draft.region is None else encode_mask_png(draft.region),
        outputs=[_output_row(output, size) for output in draft.model_outputs],
        key_row=None if draft.answer_key is None else AnswerKeyRow(key=draft.answer_key.to_json()),
    )


def _output_row(draft: ModelOutputDraft, size: tuple[int, int]) -> ModelOutput:
    if draft.mask is not None and np.asarray(draft.mask).shape != size:
        raise InvalidCaseData(f"a cached model mask must be {size}, got {np.asarray(draft.mask).shape}")
    return ModelOutput(
        model_id=draft.model_id,
        revision=draft.revision,
        parameters=dict(draft.parameters),
        answer=draft.answer,
        mask_png=None if draft.mask is None else encode_mask_png(draft.mask),
        created_at=draft.created_at,
    )


def copy_case_fields(source: Case, target: Case) -> None:
    """Copy the editable scalar fields and the burned-in review (not id/slug/created_at) between rows."""
    for name in (*CASE_FIELDS, *REVIEW_FIELDS):
        setattr(target, name, getattr(source, name))


def check_mask_size(case: Case, mask: np.ndarray | None, what: str) -> None:
    """Raise InvalidCaseData unless `mask` is None or (H, W) of the case's first image."""
    if mask is None:
        return
    image = case.images[0]
    shape = np.asarray(mask).shape
    if shape != (image.height, image.width):
        raise InvalidCaseData(
            f"{what} is {shape}; it must match the image size {(image.height, image.width)}"
        )


def case_summary(case: Case, n_images: int, n_masks: int, n_questions: int) -> CaseSummary:
    return CaseSummary(
        id=case.id,
        slug=case.slug,
        title=case.title,
        modality=case.modality,
        anatomy=case.anatomy,
        plane=case.plane,
        difficulty=case.difficulty,
        tags=tuple(case.tags),
        n_images=int(n_images),
        n_masks=int(n_masks),
        n_questions=int(n_questions),
        published=bool(case.published),
        burned_in_review=BurnedInReview(
            bool(case.burned_in_review_required), case.burned_in_reviewed_by, case.burned_in_reviewed_at
        ),
    )


def case_record(case: Case) -> CaseRecord:
    images = tuple(_image_record(image) for image in case.images)
    summary = case_summary(case, len(images), sum(len(i.masks) for i in images), len(case.questions))
    return CaseRecord(
        summary=summary,
        vignette=case.vignette,
        findings=case.findings,
        discussion=case.discussion,
        key_points=tuple(case.key_points),
        window_preset=case.window_preset,
        source=case.source,
        provenance=case.provenance,
        licence=case.licence,
        synthetic=bool(case.synthetic),
        images=images,
        questions=tuple(question_record(q) for q in case.questions),
    )


def _image_record(image: Image) -> ImageRecord:
    spacing = None
    if image.spacing_row_mm is not None and image.spacing_col_mm is not None:
        spacing = (image.spacing_row_mm, image.spacing_col_mm)
    return ImageRecord(
        id=image.id,
        position=image.position,
        description=image.description,
        png=image.png,
        width=image.width,
        height=image.height,
        spacing_mm=spacing,
        masks=tuple(MaskRecord(id=m.id, label=m.label, png=m.png) for m in image.masks),
    )


def question_record(question: Question) -> QuestionRecord:
    return QuestionRecord(
        id=question.id,
        case_id=question.case_id,
        position=question.position,
        kind=question.kind,
        prompt=question.prompt,
        reference_answer=question.reference_answer,
        synonyms=tuple(question.synonyms),
        choices=tuple(question.choices),
        target_label=question.target_label,
        region_png=question.region_png,
        answer_key=None if question.key_row is None else AnswerKey.from_json(question.key_row.key),
    )


def output_record(row: ModelOutput) -> ModelOutputRecord:
    return ModelOutputRecord(
        id=row.id,
        question_id=row.question_id,
        model_id=row.model_id,
        revision=row.revision,
        parameters=dict(row.parameters),
        answer=row.answer,
        mask_png=row.mask_png,
        created_at=row.created_at,
    )


def attempt_record(row: Attempt, case_id: int, verdict: str | None = None) -> AttemptRecord:
    return AttemptRecord(
        id=row.id,
        question_id=row.question_id,
        case_id=case_id,
        student=row.student,
        answer=row.answer,
        correct=row.correct,
        dice=row.dice,
        iou=row.iou,
        duration_s=row.duration_s,
        created_at=row.created_at,
        verdict=verdict,
    )


CSV_COLUMNS = (
    "attempt_id", "created_at", "student", "case", "question_id", "kind", "answer", "correct", "dice", "iou",
    "duration_s",
)  # fmt: skip


def attempts_csv(
    attempts: Sequence[AttemptRecord], case_slugs: Mapping[int, str], kinds: Mapping[int, str]
) -> str:
    """CSV text of quiz attempts; cells that a spreadsheet would run as formulas are quoted with '."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for a in attempts:
        row = (
            a.id, a.created_at.isoformat(timespec="seconds"), a.student, case_slugs.get(a.case_id, ""),
            a.question_id, kinds.get(a.question_id, ""), a.answer, a.correct,
            "" if a.dice is None else f"{a.dice:.4f}", "" if a.iou is None else f"{a.iou:.4f}",
            "" if a.duration_s is None else f"{a.duration_s:.1f}",
        )  # fmt: skip
        writer.writerow([_csv_safe(value) for value in row])
    return buffer.getvalue()


def _csv_safe(value: object) -> object:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def audit_record(row: AuditEntry) -> AuditRecord:
    return AuditRecord(id=row.id, at=row.at, actor=row.actor, action=row.action, case_id=row.case_id,
                       case_slug=row.case_slug, detail=row.detail)  # fmt: skip


AUDIT_COLUMNS = ("id", "at", "actor", "action", "case_id", "case_slug", "detail")


def audit_csv(records: Sequence[AuditRecord]) -> str:
    """CSV text of audit entries (formula-looking cells quoted, as in `attempts_csv`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(AUDIT_COLUMNS)
    for r in records:
        row = (r.id, r.at.isoformat(timespec="seconds"), r.actor, r.action, r.case_id, r.case_slug, r.detail)
        writer.writerow([_csv_safe(value) for value in row])
    return buffer.getvalue()
