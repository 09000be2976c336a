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
from cases.auth import MAX_PASSWORD_LENGTH, hash_password, needs_rehash, verify_dummy, verify_password
from cases.db import IMMEDIATE_OPTION, current_revision, is_sqlite, make_engine, resolve_url, upgrade_schema
from cases.errors import (
    CaseNotFound,
    DuplicateCase,
    InvalidCaseData,
    LoginThrottled,
    PermissionDenied,
    PublishBlocked,
)
from cases.imaging import encode_mask_png
from cases.marking import AnswerKey, Mark, mark_answer
from cases.models import (
    AnswerKeyRow,
    Attempt,
    AuditEntry,
    Case,
    Image,
    Instructor,
    Mask,
    ModelOutput,
    Question,
    utc_now,
)  # fmt: skip
from cases.records import (
    AttemptRecord,
    AuditRecord,
    CaseDraft,
    CaseRecord,
    CaseSummary,
    InstructorSession,
    ModelOutputRecord,
)
from cases.scoring import overlap
from cases.throttle import LoginThrottle

log = logging.getLogger(__name__)

SESSION_LIFETIME = dt.timedelta(hours=8)
SESSION_PURGE_INTERVAL = dt.timedelta(minutes=1)
MAX_USERNAME_CHARS = 80
WRONG_LOGIN = "wrong instructor username or password"
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
        self._next_purge = utc_now()
        self.throttle = LoginThrottle()
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
        if len(username) > MAX_USERNAME_CHARS or not STUDENT_ID_PATTERN.match(username):
            raise InvalidCaseData("usernames are 1-80 letters, digits, '.', '_' or '-'")
        try:
            with self._writing() as db:
                db.add(Instructor(username=username, password_hash=hash_password(password)))
                self._record(session.username, "create_instructor", detail=username, db=db)
        except IntegrityError as error:
            raise InvalidCaseData(f"instructor {username!r} already exists") from error

    def login(self, username: str, password: str, client: str = "local") -> InstructorSession:
        """Check a password and return a session; PermissionDenied when wrong.

        Unknown usernames cost one dummy verification, like a wrong password (no timing oracle).
        Failures slow further attempts from the same `client` (e.g. its IP address) and for the same
        account with capped exponential back-off (`cases.throttle`): LoginThrottled says how long to
        wait, and the owner logging in from another client waits seconds at most. Old scrypt hashes
        are replaced by argon2id on success.
        """
        if not 1 <= len(username) <= MAX_USERNAME_CHARS or len(password) > MAX_PASSWORD_LENGTH:
            raise PermissionDenied(WRONG_LOGIN)
        admission = self.throttle.begin(client[:100], username)
        if not admission.allowed:
            raise LoginThrottled(
                f"too many failed logins; try again in {admission.retry_after_s:.1f} s",
                admission.retry_after_s,
            )
        with self._reading() as db:
            stored = db.scalar(select(Instructor.password_hash).where(Instructor.username == username))
        if stored is None or not verify_password(password, stored):
            if stored is None:
                verify_dummy(password)
            self.throttle.failed(client[:100], username)
            raise PermissionDenied(WRONG_LOGIN)
        self.throttle.succeeded(client[:100], username)
        if needs_rehash(stored):
            self._rehash(username, password)
        return self._issue(username, action="login", detail=f"password, client {client[:100]}")

    def _rehash(self, username: str, password: str) -> None:
        with self._writing() as db:
            row = db.scalar(select(Instructor).where(Instructor.username == username))
            if row is not None:
                row.password_hash = hash_password(password)
        log.info("instructor %r: password hash upgraded to argon2id", username)

    def operator_session(self) -> InstructorSession:
        """A session for trusted local tools (CLI, seeding). The web portal must never call this."""
        return self._issue(OPERATOR_USERNAME)

    def external_session(self, username: str, provider: str) -> InstructorSession:
        """A session for an identity the portal verified itself (e.g. Hugging Face OAuth + allow-list)."""
        if not 1 <= len(username) <= MAX_USERNAME_CHARS:
            raise PermissionDenied(WRONG_LOGIN)
        return self._issue(f"{provider}:{username}", action="login", detail=f"via {provider}")

    def logout(self, session: InstructorSession) -> None:
        """Invalidate the session at once (its token is forgotten)."""
        with self._lock:
            known = self._sessions.pop(session.token, None)
        if known is not None:
            self._record(known.username, "logout")

    def session_for_token(self, token: str | None) -> InstructorSession | None:
        """The live session with this secret token (e.g. from an HttpOnly cookie), else None."""
        if not token:
            return None
        self._purge_expired()
        with self._lock:
            session = self._sessions.get(token)
        return session if session is not None and session.expires_at > utc_now() else None

    def is_instructor(self, session: InstructorSession | None) -> bool:
        """True when `session` was issued by this store and has not expired or been logged out."""
        if session is None:
            return False
        return self.session_for_token(session.token) == session

    @property
    def n_sessions(self) -> int:
        """Sessions held in memory (expired ones are purged at most SESSION_PURGE_INTERVAL late)."""
        return len(self._sessions)

    def _purge_expired(self, force: bool = False) -> None:
        now = utc_now()
        with self._lock:
            if not force and now < self._next_purge:
                return
            self._next_purge = now + SESSION_PURGE_INTERVAL
            for token in [t for t, s in self._sessions.items() if s.expires_at <= now]:
                del self._sessions[token]

    def _issue(self, username: str, action: str | None = None, detail: str = "") -> InstructorSession:
        self._purge_expired()
        session = InstructorSession(
            username=username, token=secrets.token_urlsafe(32), expires_at=utc_now() + SESSION_LIFETIME
        )
        with self._lock:
            self._sessions[session.token] = session
        if action is not None:
            self._record(username, action, detail=detail)
        return session

    def _require(self, session: InstructorSession | None) -> InstructorSession:
        if session is None or not self.is_instructor(session):
            raise PermissionDenied("this is an instructor action: log in as an instructor first")
        return session

    # ----------------------------------------------------------------------------------- audit

    def _record(self, actor: str, action: str, case: Case | None = None, detail: str = "",
                db: Session | None = None) -> None:  # fmt: skip
        entry = AuditEntry(actor=actor, action=action, case_id=None if case is None else case.id,
                           case_slug=None if case is None else case.slug, detail=detail)  # fmt: skip
        if db is not None:
            db.add(entry)
            return
        with self._writing() as own:
            own.add(entry)

    def log_action(self, session: InstructorSession, action: str, detail: str = "") -> None:
        """Add an audit entry for an action done outside the store's own methods (e.g. archive export)."""
        session = self._require(session)
        self._record(session.username, action, detail=detail[:2000])

    def audit_log(self, session: InstructorSession, limit: int = 10_000) -> tuple[AuditRecord, ...]:
        """Instructor actions, newest first (instructor only)."""
        self._require(session)
        with self._reading() as db:
            rows = db.scalars(
                select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(limit)
            )
            return tuple(convert.audit_record(row) for row in rows)

    def audit_csv(self, session: InstructorSession) -> str:
        """The audit log as CSV text (instructor only); the export itself is logged."""
        records = self.audit_log(session)
        self._record(session.username, "export_audit_log", detail=f"{len(records)} entries")
        return convert.audit_csv(records)

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
        Closed and open answers are marked with the question's key (cases.marking): `verdict` is
        correct / partly correct / wrong and `correct` True / None / False; segmentation → None (dice/iou).
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
            mark = _mark(question, answer)
            row = Attempt(
                question_id=question_id,
                student=student,
                answer=answer,
                correct=None if mark is None else mark.correct,
                mask_png=None if drawn_mask is None else encode_mask_png(drawn_mask),
                dice=None if scores is None else scores.dice,
                iou=None if scores is None else scores.iou,
                duration_s=duration_s,
            )
            db.add(row)
            db.flush()
            return convert.attempt_record(row, question.case_id, None if mark is None else mark.verdict)

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
        """Quiz results as CSV text (instructor only); see `cases.convert.attempts_csv`. Logged."""
        attempts = self.all_attempts(session)
        self._record(session.username, "export_quiz_results", detail=f"{len(attempts)} attempts")
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
        session = self._require(session)
        rows = [convert.case_row(draft) for draft in drafts]  # validates before touching the DB
        for row, draft in zip(rows, drafts, strict=True):
            _apply_review(row, draft, session.username)
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
            for row in rows:
                self._record(session.username, "create", row, detail=_state(row), db=db)
            return tuple(convert.case_record(row) for row in rows)

    def update_case(self, session: InstructorSession, case: int | str, draft: CaseDraft) -> CaseRecord:
        """Replace a case's content (images, masks, questions included) keeping its id and slug.

        Cached model outputs and attempts of the old questions are deleted with them.
        """
        session = self._require(session)
        fresh = convert.case_row(draft)
        with self._writing() as db:
            row = self._load_case(db, case)
            _carry_review(row, fresh, draft)
            _apply_review(fresh, draft, session.username)
            convert.copy_case_fields(fresh, row)
            images, questions = list(fresh.images), list(fresh.questions)
            fresh.images, fresh.questions = [], []  # detach, so the throw-away row is never inserted
            row.images, row.questions = images, questions
            row.updated_at = utc_now()
            db.flush()
            self._record(session.username, "edit", row, detail=_state(row), db=db)
            return convert.case_record(row)

    def set_answer_key(self, session: InstructorSession, question_id: int, key: AnswerKey | None) -> None:
        """Replace (or, with None, remove) the answer key of an open or closed question (instructor only).

        Earlier attempts keep the verdict they were given; new answers are marked with the new key.
        """
        self._require(session)
        with self._writing() as db:
            question = db.get(Question, question_id)
            if question is None:
                raise CaseNotFound(f"no question {question_id}")
            if question.kind == "segmentation":
                raise InvalidCaseData("segmentation questions are scored by Dice/IoU; they have no answer key")
            question.key_row = None if key is None else AnswerKeyRow(key=key.to_json())
            db.flush()

    def set_published(self, session: InstructorSession, case: int | str, published: bool) -> CaseSummary:
        """Publish or unpublish a case (instructor only); PublishBlocked while a burned-in review is due."""
        session = self._require(session)
        with self._writing() as db:
            row = self._load_case(db, case)
            if published:
                _check_gate(row)
            row.published = published
            self._record(session.username, "publish" if published else "unpublish", row, db=db)
            row.updated_at = utc_now()
            db.flush()
            case_id = row.id
        return self._summary_of(case_id)

    def delete_case(self, session: InstructorSession, case: int | str) -> None:
        """Delete a case with its images, masks, questions, outputs and attempts (instructor only)."""
        session = self._require(session)
        with self._writing() as db:
            row = self._load_case(db, case)
            self._record(session.username, "delete", row, detail=row.title[:200], db=db)
            db.execute(
                Attempt.__table__.delete().where(Attempt.question_id.in_([q.id for q in row.questions]))
            )
            db.delete(row)

    def confirm_burned_in_review(self, session: InstructorSession, case: int | str) -> CaseSummary:
        """Record that this instructor checked the case's pixels for burned-in text (who, when)."""
        session = self._require(session)
        with self._writing() as db:
            row = self._load_case(db, case)
            row.burned_in_reviewed_by = session.username
            row.burned_in_reviewed_at = utc_now()
            self._record(session.username, "confirm_burned_in_review", row, db=db)
            case_id = row.id
        return self._summary_of(case_id)

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


def _apply_review(row: Case, draft: CaseDraft, username: str) -> None:
    """Store the draft's burned-in flag and, when confirmed, the review; refuse an unreviewed publish."""
    row.burned_in_review_required = bool(row.burned_in_review_required or draft.burned_in_suspected)
    if row.burned_in_review_required and draft.burned_in_reviewed and row.burned_in_reviewed_by is None:
        row.burned_in_reviewed_by, row.burned_in_reviewed_at = username, utc_now()
    if row.published:
        _check_gate(row)


def _carry_review(stored: Case, fresh: Case, draft: CaseDraft) -> None:
    """An edit keeps the stored flag; a newly flagged image needs a new review."""
    fresh.burned_in_review_required = bool(stored.burned_in_review_required)
    if not draft.burned_in_suspected:
        fresh.burned_in_reviewed_by = stored.burned_in_reviewed_by
        fresh.burned_in_reviewed_at = stored.burned_in_reviewed_at


def _check_gate(row: Case) -> None:
    if row.burned_in_review_required and row.burned_in_reviewed_by is None:
        raise PublishBlocked(
            f"case {row.slug!r} may show burned-in names, dates or IDs: an instructor must confirm the pixels "
            "were checked before it is published"
        )


def _state(row: Case) -> str:
    return "published" if row.published else "unpublished"


def _text_filter(text: str) -> Any:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    pattern = f"%{escaped}%"
    columns = (Case.title, Case.anatomy, Case.modality, Case.vignette, Case.findings, Case.discussion)
    clauses = [column.ilike(pattern, escape="\\") for column in columns]
    clauses.append(cast(Case.tags, String).ilike(pattern, escape="\\"))
    return or_(*clauses)


def _mark(question: Question, answer: str) -> Mark | None:
    """The verdict of a closed or open answer with the question's key; None for segmentation."""
    if question.kind == "segmentation":
        return None
    record = convert.question_record(question)
    return mark_answer(answer, record.key())


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
