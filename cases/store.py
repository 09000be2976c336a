"""`CaseStore`: the one facade over the teaching-case database.

One engine and one session factory per store; one short transaction per public method; only frozen
dataclasses (cases.records) leave it. Instructor actions take an `InstructorSession` issued by `login`
(or `operator_session` for trusted local tools such as the CLI) and are refused otherwise, so an
anonymous portal user cannot create, edit, publish, delete or export anything.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import String, cast, func, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from cases import convert
from cases.auth import hash_password, verify_password
from cases.db import IMMEDIATE_OPTION, current_revision, is_sqlite, make_engine, resolve_url, upgrade_schema
from cases.errors import CaseNotFound, DuplicateCase, InvalidCaseData, PermissionDenied
from cases.imaging import encode_mask_png
from cases.models import Attempt, Case, Image, Instructor, Mask, ModelOutput, Question, utc_now
from cases.records import (
    AttemptRecord,
    CaseDraft,
    CaseRecord,
    CaseSummary,
    InstructorSession,
    ModelOutputRecord,
)
from cases.scoring import answer_matches, overlap

log = logging.getLogger(__name__)

SESSION_LIFETIME = dt.timedelta(hours=8)
MAX_FAILED_LOGINS = 5  # per username within LOGIN_LOCKOUT; then logins are refused until it passes
LOGIN_LOCKOUT = dt.timedelta(minutes=15)
STUDENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")  # pseudonyms and usernames: at most 80 characters
MAX_ANSWER_CHARS = 1000  # a stored quiz answer (a person's typed answer is a few words)
MAX_ATTEMPTS_PER_STUDENT_MINUTE = 12  # stored attempts per student id per minute: faster than anyone answers
MAX_ATTEMPTS_PER_MINUTE = 600  # stored attempts per minute from everyone: a class of 100 at a brisk pace
RATE_WINDOW = dt.timedelta(minutes=1)


class TooManyAttempts(InvalidCaseData):
    """Attempts arrive faster than a person could answer; nothing was stored."""
OPERATOR_USERNAME = "operator (local)"


class CaseStore:
    """The teaching-case library at a SQLAlchemy URL (None → `var/medplib_cases.sqlite`).

    Opening runs `alembic upgrade head`; a database that was empty also gets the starter library
    (`seed_starter=False` skips it, e.g. in tests).
    """

    def __init__(self, url: str | None = None, *, seed_starter: bool = True) -> None:
        self.url = resolve_url(url)
        self.engine = make_engine(self.url)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(
            self.engine.execution_options(**{IMMEDIATE_OPTION: True}), expire_on_commit=False
        )
        self._sessions: dict[str, InstructorSession] = {}
        self._failed_logins: dict[str, list[dt.datetime]] = {}
        self._lock = threading.Lock()
        was_empty = current_revision(self.engine) is None
        upgrade_schema(self.engine)
        if was_empty and seed_starter:
            from cases.starter import seed_starter_library  # local: starter reads the asset folder

            seed_starter_library(self)

    def __repr__(self) -> str:
        return f"CaseStore({make_url(self.url).render_as_string(hide_password=True)!r})"

    def close(self) -> None:
        """Dispose of the connection pool."""
        self.engine.dispose()

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.url)

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with self._read.begin() as session:
            yield session

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        with self._write.begin() as session:
            yield session

    # ----------------------------------------------------------------------------------- accounts

    def create_instructor(self, session: InstructorSession, username: str, password: str) -> None:
        """Create an instructor account (needs an instructor or operator session)."""
        self._require(session)
        if not STUDENT_ID_PATTERN.match(username):
            raise InvalidCaseData("usernames are 1-80 letters, digits, '.', '_' or '-'")
        try:
            with self._writing() as db:
                db.add(Instructor(username=username, password_hash=hash_password(password)))
        except IntegrityError as error:
            raise InvalidCaseData(f"instructor {username!r} already exists") from error

    def login(self, username: str, password: str) -> InstructorSession:
        """Check a password (constant-time) and return a session; PermissionDenied when wrong.

        After MAX_FAILED_LOGINS failures for one username within LOGIN_LOCKOUT, logins are refused.
        """
        self._check_lockout(username)
        with self._reading() as db:
            row = db.scalar(select(Instructor).where(Instructor.username == username))
            stored = row.password_hash if row is not None else None
        if stored is None or not verify_password(password, stored):
            with self._lock:
                self._failed_logins.setdefault(username, []).append(utc_now())
            raise PermissionDenied("wrong instructor username or password")
        with self._lock:
            self._failed_logins.pop(username, None)
        return self._issue(username)

    def _check_lockout(self, username: str) -> None:
        since = utc_now() - LOGIN_LOCKOUT
        with self._lock:
            recent = [t for t in self._failed_logins.get(username, []) if t > since]
            self._failed_logins[username] = recent
        if len(recent) >= MAX_FAILED_LOGINS:
            raise PermissionDenied(f"too many failed logins for {username!r}; try again in 15 minutes")

    def operator_session(self) -> InstructorSession:
        """A session for trusted local tools (CLI, seeding). The web portal must never call this."""
        return self._issue(OPERATOR_USERNAME)

    def logout(self, session: InstructorSession) -> None:
        with self._lock:
            self._sessions.pop(session.token, None)

    def is_instructor(self, session: InstructorSession | None) -> bool:
        """True when `session` was issued by this store and has not expired or been logged out."""
        if session is None:
            return False
        with self._lock:
            known = self._sessions.get(session.token)
        return known == session and known.expires_at > utc_now()

    def _issue(self, username: str) -> InstructorSession:
        session = InstructorSession(
            username=username, token=secrets.token_urlsafe(32), expires_at=utc_now() + SESSION_LIFETIME
        )
        with self._lock:
            self._sessions[session.token] = session
        return session

    def _require(self, session: InstructorSession | None) -> None:
        if not self.is_instructor(session):
            raise PermissionDenied("this is an instructor action: log in as an instructor first")

    # ----------------------------------------------------------------------------------- reading

    def list_cases(
        self,
        *,
        modality: str | None = None,
        anatomy: str | None = None,
        difficulty: str | None = None,
        text: str | None = None,
        include_unpublished: bool = False,
    ) -> tuple[CaseSummary, ...]:
        """Case summaries ordered by title; filters are exact except `text` (substring, any field)."""
        query = _summary_query()
        if not include_unpublished:
            query = query.where(Case.published.is_(True))
        for column, value in (
            (Case.modality, modality),
            (Case.anatomy, anatomy),
            (Case.difficulty, difficulty),
        ):
            if value:
                query = query.where(column == value)
        if text and text.strip():
            query = query.where(_text_filter(text.strip()))
        with self._reading() as db:
            return tuple(_summary(*row) for row in db.execute(query.order_by(Case.title, Case.id)))

    def facets(self) -> dict[str, tuple[str, ...]]:
        """Distinct modality / anatomy / difficulty values of published cases, for filter menus."""
        with self._reading() as db:
            return {
                name: tuple(
                    db.scalars(select(column).where(Case.published.is_(True)).distinct().order_by(column))
                )
                for name, column in (
                    ("modality", Case.modality),
                    ("anatomy", Case.anatomy),
                    ("difficulty", Case.difficulty),
                )
            }

    def get_case(self, case: int | str, session: InstructorSession | None = None) -> CaseRecord:
        """A full case by id or slug; unpublished cases only with an instructor session."""
        with self._reading() as db:
            row = self._load_case(db, case)
            if not row.published and not self.is_instructor(session):
                raise CaseNotFound(f"no published case {case!r}")
            return convert.case_record(row)

    def model_outputs(self, question_id: int) -> tuple[ModelOutputRecord, ...]:
        """Cached model outputs of a question, newest first."""
        with self._reading() as db:
            rows = db.scalars(
                select(ModelOutput)
                .where(ModelOutput.question_id == question_id)
                .order_by(ModelOutput.created_at.desc(), ModelOutput.id.desc())
            )
            return tuple(convert.output_record(row) for row in rows)

    def _load_case(self, db: Session, case: int | str) -> Case:
        query = select(Case).options(
            selectinload(Case.images).selectinload(Image.masks), selectinload(Case.questions)
        )
        is_id = isinstance(case, int) or (isinstance(case, str) and case.isdigit())
        query = query.where(Case.id == int(case)) if is_id else query.where(Case.slug == case)
        row = db.scalar(query)
        if row is None:
            raise CaseNotFound(f"no case {case!r}; `python -m cases list` shows the ids")
        return row

    # ----------------------------------------------------------------------------------- quiz

    def record_attempt(
        self,
        question_id: int,
        student: str,
        answer: str = "",
        drawn_mask: np.ndarray | None = None,
        duration_s: float | None = None,
    ) -> AttemptRecord:
        """Score and store one quiz attempt (anonymous allowed; only published cases).

        drawn_mask: (H, W) bool at the case's first image size, for segmentation questions.
        correct: closed → answer == reference; open → True on a reference/synonym match, else None
        (free text needs the student's own comparison); segmentation → None (see dice/iou).
        """
        if not STUDENT_ID_PATTERN.match(student):
            raise InvalidCaseData("student ids are 1-80 letters, digits, '.', '_' or '-' (no real names)")
        if len(answer) > MAX_ANSWER_CHARS:
            raise InvalidCaseData(f"answers are at most {MAX_ANSWER_CHARS} characters; shorten yours")
        with self._writing() as db:
            _check_attempt_rate(db, student)
            question = db.get(Question, question_id)
            if question is None or not question.case.published:
                raise CaseNotFound(f"no published question {question_id}")
            scores = _score_drawing(question, drawn_mask)
            row = Attempt(
                question_id=question_id,
                student=student,
                answer=answer,
                correct=_answer_correct(question, answer),
                mask_png=None if drawn_mask is None else encode_mask_png(drawn_mask),
                dice=None if scores is None else scores.dice,
                iou=None if scores is None else scores.iou,
                duration_s=duration_s,
            )
            db.add(row)
            db.flush()
            return convert.attempt_record(row, question.case_id)

    def student_attempts(self, student: str) -> tuple[AttemptRecord, ...]:
        """A student's own attempts, oldest first (session progress)."""
        with self._reading() as db:
            rows = db.execute(
                select(Attempt, Question.case_id)
                .join(Question)
                .where(Attempt.student == student)
                .order_by(Attempt.created_at, Attempt.id)
            )
            return tuple(convert.attempt_record(a, case_id) for a, case_id in rows)

    def all_attempts(self, session: InstructorSession) -> tuple[AttemptRecord, ...]:
        """Every attempt, oldest first (instructor only)."""
        self._require(session)
        with self._reading() as db:
            rows = db.execute(
                select(Attempt, Question.case_id).join(Question).order_by(Attempt.created_at, Attempt.id)
            )
            return tuple(convert.attempt_record(a, case_id) for a, case_id in rows)

    def attempts_csv(self, session: InstructorSession) -> str:
        """Quiz results as CSV text (instructor only); see `cases.convert.attempts_csv`."""
        attempts = self.all_attempts(session)
        with self._reading() as db:
            titles = dict(db.execute(select(Case.id, Case.slug)).tuples().all())
            kinds = dict(db.execute(select(Question.id, Question.kind)).tuples().all())
        return convert.attempts_csv(attempts, titles, kinds)

    # ----------------------------------------------------------------------------------- editing

    def create_case(self, session: InstructorSession, draft: CaseDraft) -> CaseRecord:
        """Validate and store a new case (instructor only); DuplicateCase when the slug exists."""
        return self.create_cases(session, [draft])[0]

    def create_cases(self, session: InstructorSession, drafts: Sequence[CaseDraft]) -> tuple[CaseRecord, ...]:
        """Store several cases in ONE transaction: all or nothing (instructor only)."""
        self._require(session)
        rows = [convert.case_row(draft) for draft in drafts]  # validates before touching the DB
        slugs = [row.slug for row in rows]
        if len(set(slugs)) != len(slugs):
            raise DuplicateCase(f"the same slug appears twice in one batch: {sorted(slugs)}")
        with self._writing() as db:
            taken = set(db.scalars(select(Case.slug).where(Case.slug.in_(slugs))))
            if taken:
                names = sorted(taken)
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                raise DuplicateCase(
                    f"{len(names)} cases already exist ({shown}); delete them or change their slug"
                )
            db.add_all(rows)
            db.flush()
            return tuple(convert.case_record(row) for row in rows)

    def update_case(self, session: InstructorSession, case: int | str, draft: CaseDraft) -> CaseRecord:
        """Replace a case's content (images, masks, questions included) keeping its id and slug.

        Cached model outputs and attempts of the old questions are deleted with them.
        """
        self._require(session)
        fresh = convert.case_row(draft)
        with self._writing() as db:
            row = self._load_case(db, case)
            convert.copy_case_fields(fresh, row)
            images, questions = list(fresh.images), list(fresh.questions)
            fresh.images, fresh.questions = [], []  # detach, so the throw-away row is never inserted
            row.images, row.questions = images, questions
            row.updated_at = utc_now()
            db.flush()
            return convert.case_record(row)

    def set_published(self, session: InstructorSession, case: int | str, published: bool) -> CaseSummary:
        """Publish or unpublish a case (instructor only)."""
        self._require(session)
        with self._writing() as db:
            row = self._load_case(db, case)
            row.published = published
            row.updated_at = utc_now()
            db.flush()
            case_id = row.id
        return self._summary_of(case_id)

    def delete_case(self, session: InstructorSession, case: int | str) -> None:
        """Delete a case with its images, masks, questions, outputs and attempts (instructor only)."""
        self._require(session)
        with self._writing() as db:
            row = self._load_case(db, case)
            db.execute(
                Attempt.__table__.delete().where(Attempt.question_id.in_([q.id for q in row.questions]))
            )
            db.delete(row)

    def save_model_output(
        self,
        session: InstructorSession,
        question_id: int,
        *,
        model_id: str,
        revision: str | None,
        parameters: dict[str, Any],
        answer: str,
        mask: np.ndarray | None,
    ) -> ModelOutputRecord:
        """Cache a model answer (and (H, W) bool mask) for a question (instructor/operator only)."""
        self._require(session)
        return self._add_output(
            question_id, model_id, revision, parameters, answer, mask, published_only=False
        )

    def cache_live_output(
        self,
        question_id: int,
        *,
        model_id: str,
        revision: str | None,
        parameters: dict[str, Any],
        answer: str,
        mask: np.ndarray | None,
    ) -> ModelOutputRecord:
        """Cache an answer the portal's own engine just computed for a question of a *published* case.

        No session: the portal calls it when a student reveals a question that has no cached output yet
        (the answer comes from the server's model, never from the user). Unpublished cases are refused.
        """
        return self._add_output(
            question_id, model_id, revision, parameters, answer, mask, published_only=True
        )

    def _add_output(
        self,
        question_id: int,
        model_id: str,
        revision: str | None,
        parameters: dict[str, Any],
        answer: str,
        mask: np.ndarray | None,
        *,
        published_only: bool,
    ) -> ModelOutputRecord:
        with self._writing() as db:
            question = db.get(Question, question_id)
            if question is None or (published_only and not question.case.published):
                raise CaseNotFound(f"no {'published ' if published_only else ''}question {question_id}")
            convert.check_mask_size(question.case, mask, "model mask")
            row = ModelOutput(
                question_id=question_id,
                model_id=model_id,
                revision=revision,
                parameters=dict(parameters),
                answer=answer,
                mask_png=None if mask is None else encode_mask_png(mask),
            )
            db.add(row)
            db.flush()
            return convert.output_record(row)

    def _summary_of(self, case_id: int) -> CaseSummary:
        with self._reading() as db:
            return _summary(*db.execute(_summary_query().where(Case.id == case_id)).one())

    # ----------------------------------------------------------------------------------- backup

    def backup(self, destination: str | Path) -> Path:
        """Copy a SQLite library with the online backup API (consistent even while others write)."""
        if not self.is_sqlite:
            raise InvalidCaseData(
                f"backup uses SQLite's online backup API; {make_url(self.url).get_backend_name()} databases "
                "need their own tool (e.g. pg_dump)"
            )
        target = Path(destination)
        if target.exists():
            raise InvalidCaseData(f"{target} already exists; choose a new backup file name")
        target.parent.mkdir(parents=True, exist_ok=True)
        raw = self.engine.raw_connection()
        try:
            with sqlite3.connect(target) as copy:
                raw.driver_connection.backup(copy)
            copy.close()
        finally:
            raw.close()
        return target


def _summary_query() -> Any:
    n_images = select(func.count(Image.id)).where(Image.case_id == Case.id).scalar_subquery()
    n_masks = (
        select(func.count(Mask.id)).join(Image, Mask.image_id == Image.id).where(Image.case_id == Case.id)
    ).scalar_subquery()
    n_questions = select(func.count(Question.id)).where(Question.case_id == Case.id).scalar_subquery()
    return select(Case, n_images, n_masks, n_questions)


def _summary(case: Case, n_images: int, n_masks: int, n_questions: int) -> CaseSummary:
    return convert.case_summary(case, n_images, n_masks, n_questions)


def _text_filter(text: str) -> Any:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    pattern = f"%{escaped}%"
    columns = (Case.title, Case.anatomy, Case.modality, Case.vignette, Case.findings, Case.discussion)
    clauses = [column.ilike(pattern, escape="\\") for column in columns]
    clauses.append(cast(Case.tags, String).ilike(pattern, escape="\\"))
    return or_(*clauses)


def _answer_correct(question: Question, answer: str) -> bool | None:
    if question.kind == "closed":
        return answer_matches(answer, question.reference_answer, tuple(question.synonyms))
    if question.kind == "open":
        return True if answer_matches(answer, question.reference_answer, tuple(question.synonyms)) else None
    return None


def _score_drawing(question: Question, drawn: np.ndarray | None) -> Any:
    if drawn is None or question.target_label is None:
        return None
    image = question.case.images[0]
    reference = next((m for m in image.masks if m.label == question.target_label), None)
    if reference is None:
        raise InvalidCaseData(
            f"question {question.id} names mask {question.target_label!r}, which is missing"
        )
    convert.check_mask_size(question.case, drawn, "drawn mask")
    from cases.imaging import decode_mask

    return overlap(np.asarray(drawn).astype(bool), decode_mask(reference.png))


def _check_attempt_rate(db: Session, student: str) -> None:
    """Refuse an attempt when this student, or everyone together, stored too many within the last minute."""
    since = utc_now() - RATE_WINDOW
    recent = select(func.count()).select_from(Attempt).where(Attempt.created_at > since)
    if db.scalar(recent.where(Attempt.student == student)) >= MAX_ATTEMPTS_PER_STUDENT_MINUTE:
        raise TooManyAttempts("too many answers in one minute; take a moment before the next one")
    if db.scalar(recent) >= MAX_ATTEMPTS_PER_MINUTE:
        raise TooManyAttempts("the quiz is receiving too many answers right now; try again in a minute")
