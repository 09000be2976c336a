"""Teaching-case library: SQLite/SQLAlchemy store, starter cases, de-identification, quiz scoring.

`cases` knows nothing of torch or gradio. The portal uses `CaseStore`; `python -m cases` is the CLI.
"""

from cases.db import DEFAULT_DB_PATH
from cases.errors import (
    ArchiveError,
    CaseNotFound,
    CaseStoreError,
    DuplicateCase,
    InvalidCaseData,
    PermissionDenied,
)
from cases.records import (
    AttemptRecord,
    CaseDraft,
    CaseRecord,
    CaseSummary,
    ImageDraft,
    ImageRecord,
    InstructorSession,
    MaskDraft,
    MaskRecord,
    ModelOutputRecord,
    QuestionDraft,
    QuestionRecord,
)
from cases.scoring import dice, iou, overlap
from cases.store import CaseStore

__all__ = [
    "DEFAULT_DB_PATH",
    "ArchiveError",
    "AttemptRecord",
    "CaseDraft",
    "CaseNotFound",
    "CaseRecord",
    "CaseStore",
    "CaseStoreError",
    "CaseSummary",
    "DuplicateCase",
    "ImageDraft",
    "ImageRecord",
    "InstructorSession",
    "InvalidCaseData",
    "MaskDraft",
    "MaskRecord",
    "ModelOutputRecord",
    "PermissionDenied",
    "QuestionDraft",
    "QuestionRecord",
    "dice",
    "iou",
    "overlap",
]
