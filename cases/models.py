"""SQLAlchemy 2 ORM tables of the teaching-case library.

ORM objects never leave `cases.store`: the store copies them into the frozen dataclasses of
`cases.records` inside the transaction. Images and masks are PNG bytes stored in the database so that
one database file is a complete, portable library. Schema changes go through Alembic
(`cases/migrations`), never through `Base.metadata.create_all`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utc_now() -> dt.datetime:
    """Timezone-aware UTC now (stored as naive UTC: SQLite has no time zones)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class Case(Base):
    """One teaching case: Radiopaedia-style fields plus provenance and a published flag."""

    __tablename__ = "cases"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(120), unique=True)  # stable public id
    title: Mapped[str] = mapped_column(String(200))
    modality: Mapped[str] = mapped_column(String(40), index=True)
    anatomy: Mapped[str] = mapped_column(String(80), index=True)
    plane: Mapped[str] = mapped_column(String(40))
    difficulty: Mapped[str] = mapped_column(String(40))  # training level
    vignette: Mapped[str] = mapped_column(Text)
    findings: Mapped[str] = mapped_column(Text)
    discussion: Mapped[str] = mapped_column(Text)
    key_points: Mapped[list[str]] = mapped_column(JSON)
    tags: Mapped[list[str]] = mapped_column(JSON)
    window_preset: Mapped[str | None] = mapped_column(String(40))
    source: Mapped[str] = mapped_column(String(200))
    provenance: Mapped[str] = mapped_column(Text)
    licence: Mapped[str] = mapped_column(String(120))
    synthetic: Mapped[bool] = mapped_column(Boolean, default=False)
    published: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    # Publish gate (migration 0002): set when an image may hold burned-in text; publishing needs a review.
    burned_in_review_required: Mapped[bool] = mapped_column(Boolean, default=False)
    burned_in_reviewed_by: Mapped[str | None] = mapped_column(String(80))
    burned_in_reviewed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now, onupdate=utc_now)

    images: Mapped[list[Image]] = relationship(
        back_populates="case", cascade="all, delete-orphan", order_by="Image.position"
    )
    questions: Mapped[list[Question]] = relationship(
        back_populates="case", cascade="all, delete-orphan", order_by="Question.position"
    )


class Image(Base):
    """A key image of a case: (H, W, 3) RGB as PNG bytes, with its pixel spacing when known."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(String(200), default="")
    png: Mapped[bytes] = mapped_column(LargeBinary)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    spacing_row_mm: Mapped[float | None] = mapped_column(Float)
    spacing_col_mm: Mapped[float | None] = mapped_column(Float)

    case: Mapped[Case] = relationship(back_populates="images")
    masks: Mapped[list[Mask]] = relationship(
        back_populates="image", cascade="all, delete-orphan", order_by="Mask.id"
    )


class Mask(Base):
    """A labelled reference mask at its image's size: 1-bit-like PNG (0 background, 255 structure)."""

    __tablename__ = "masks"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(80))
    png: Mapped[bytes] = mapped_column(LargeBinary)

    image: Mapped[Image] = relationship(back_populates="masks")


class Question(Base):
    """A curated question: closed (choices), open (free text) or segmentation (draw `target_label`)."""

    __tablename__ = "questions"

    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(20))
    prompt: Mapped[str] = mapped_column(Text)
    reference_answer: Mapped[str] = mapped_column(Text)
    synonyms: Mapped[list[str]] = mapped_column(JSON)
    choices: Mapped[list[str]] = mapped_column(JSON)
    target_label: Mapped[str | None] = mapped_column(String(80))
    region_png: Mapped[bytes | None] = mapped_column(LargeBinary)  # optional region prompt mask

    case: Mapped[Case] = relationship(back_populates="questions")
    outputs: Mapped[list[ModelOutput]] = relationship(
        back_populates="question", cascade="all, delete-orphan", order_by="ModelOutput.id"
    )
    key_row: Mapped[AnswerKeyRow | None] = relationship(cascade="all, delete-orphan", lazy="selectin")


class ModelOutput(Base):
    """A cached model answer to a question, so the quiz works without a GPU."""

    __tablename__ = "model_outputs"

    id: Mapped[int] = mapped_column(primary_key=True)
    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(String(200))
    revision: Mapped[str | None] = mapped_column(String(80))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    answer: Mapped[str] = mapped_column(Text)
    mask_png: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now)

    question: Mapped[Question] = relationship(back_populates="outputs")


class Attempt(Base):
    """One quiz attempt by an anonymous browser id or a course pseudonym (never a real name)."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id", ondelete="CASCADE"), index=True)
    student: Mapped[str] = mapped_column(String(80), index=True)
    answer: Mapped[str] = mapped_column(Text)
    correct: Mapped[bool | None] = mapped_column(Boolean)
    mask_png: Mapped[bytes | None] = mapped_column(LargeBinary)
    dice: Mapped[float | None] = mapped_column(Float)
    iou: Mapped[float | None] = mapped_column(Float)
    duration_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now)


class AuditEntry(Base):
    """One instructor action (migration 0002). No foreign key: the entry outlives a deleted case."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now, index=True)
    actor: Mapped[str] = mapped_column(String(80), index=True)
    action: Mapped[str] = mapped_column(String(40))
    case_id: Mapped[int | None] = mapped_column(Integer, index=True)
    case_slug: Mapped[str | None] = mapped_column(String(120))
    detail: Mapped[str] = mapped_column(Text, default="")


class Instructor(Base):
    """An instructor account; `password_hash` is an argon2id (or legacy scrypt) string (see cases.auth)."""

    __tablename__ = "instructors"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(80), unique=True)
    password_hash: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now)


class AnswerKeyRow(Base):
    """The instructor's answer key of a question (cases.marking.AnswerKey as JSON); at most one each."""

    __tablename__ = "answer_keys"

    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now, onupdate=utc_now)


class ClassSession(Base):
    """A quiz an instructor hands to a class: a join code, an ordered set of questions, open or closed."""

    __tablename__ = "class_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(12), unique=True)
    title: Mapped[str] = mapped_column(String(200))
    created_by: Mapped[str] = mapped_column(String(80))
    is_open: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now)
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    items: Mapped[list[ClassSessionItem]] = relationship(
        cascade="all, delete-orphan", order_by="ClassSessionItem.position"
    )


class ClassSessionItem(Base):
    """One question of a class session, in quiz order."""

    __tablename__ = "class_session_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("class_sessions.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id", ondelete="CASCADE"), index=True)


class ClassSessionStudent(Base):
    """A pseudonym that joined a class session (unique within it)."""

    __tablename__ = "class_session_students"
    __table_args__ = (UniqueConstraint("session_id", "pseudonym", name="uq_class_session_students_pseudonym"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("class_sessions.id", ondelete="CASCADE"), index=True)
    pseudonym: Mapped[str] = mapped_column(String(80))
    joined_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now)


class ClassSessionAnswer(Base):
    """A student's answer in a class session: the scored quiz attempt plus its verdict."""

    __tablename__ = "class_session_answers"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("class_sessions.id", ondelete="CASCADE"), index=True)
    student_id: Mapped[int] = mapped_column(ForeignKey("class_session_students.id", ondelete="CASCADE"), index=True)
    attempt_id: Mapped[int] = mapped_column(ForeignKey("attempts.id", ondelete="CASCADE"), unique=True)
    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id", ondelete="CASCADE"), index=True)
    verdict: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utc_now)
