"""Class sessions: an instructor hands a set of questions to a class under a short join code.

Students join with the code and a pseudonym, answer each question once, and the instructor reads the
results: per question the share correct / partly correct / wrong, the Dice and IoU of the drawings and
the most common wrong answers; per student the progress; everything as CSV. Answers are ordinary quiz
attempts (`CaseStore.record_attempt`, marked with the question's answer key) linked to the session.

`Classroom` sits beside `CaseStore` and uses its engine and rights check: instructor actions need an
`InstructorSession` the store issued, exactly as case editing does.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from cases.convert import question_record
from cases.errors import CaseNotFound, InvalidCaseData, PermissionDenied
from cases.marking import CORRECT, PARTLY, WRONG, normalise
from cases.models import (
    Attempt,
    ClassSession,
    ClassSessionAnswer,
    ClassSessionItem,
    ClassSessionStudent,
    Question,
    utc_now,
)
from cases.records import AttemptRecord, InstructorSession, QuestionRecord
from cases.store import STUDENT_ID_PATTERN, CaseStore

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: codes are read aloud and typed
CODE_LENGTH = 6
MAX_SESSION_QUESTIONS = 100
MAX_TITLE_CHARS = 200
TOP_WRONG_ANSWERS = 5


@dataclass(frozen=True)
class ClassSessionRecord:
    """A class session as the instructor sees it."""

    id: int
    code: str
    title: str
    created_by: str
    is_open: bool
    created_at: dt.datetime
    question_ids: tuple[int, ...]
    n_students: int


@dataclass(frozen=True)
class QuestionStats:
    """Results of one question in one session; shares are of the students who answered it."""

    question_id: int
    case_id: int
    kind: str
    prompt: str
    reference_answer: str
    n_answers: int
    share_correct: float | None
    share_partly: float | None
    share_wrong: float | None
    dice: tuple[float, ...]
    iou: tuple[float, ...]
    common_wrong: tuple[tuple[str, int], ...]  # (normalised answer, count), most common first


@dataclass(frozen=True)
class StudentProgress:
    """One pseudonym's progress in a session."""

    pseudonym: str
    answered: int
    total: int
    correct: int
    partly: int
    mean_dice: float | None


@dataclass(frozen=True)
class SessionResults:
    session: ClassSessionRecord
    questions: tuple[QuestionStats, ...]
    students: tuple[StudentProgress, ...]


@dataclass(frozen=True)
class SessionAnswerRow:
    """One row of the CSV export."""

    pseudonym: str
    question_id: int
    kind: str
    answer: str
    verdict: str | None
    dice: float | None
    iou: float | None
    created_at: dt.datetime


class Classroom:
    """Class sessions over a `CaseStore` (same database, same transactions style, same rights check)."""

    def __init__(self, store: CaseStore) -> None:
        self.store = store

    # ------------------------------------------------------------------------------------- instructor

    def create_session(self, session: InstructorSession, title: str, question_ids: Sequence[int]) -> ClassSessionRecord:
        """A new open session over published questions (in the given order), with a fresh join code."""
        self.store._require(session)
        ids = list(dict.fromkeys(int(q) for q in question_ids))
        if not title.strip() or len(title) > MAX_TITLE_CHARS:
            raise InvalidCaseData(f"a class session needs a title of 1 to {MAX_TITLE_CHARS} characters")
        if not 1 <= len(ids) <= MAX_SESSION_QUESTIONS:
            raise InvalidCaseData(f"choose 1 to {MAX_SESSION_QUESTIONS} questions for a class session")
        with self.store._writing() as db:
            found = {q.id: q for q in db.scalars(select(Question).where(Question.id.in_(ids)))}
            missing = [q for q in ids if q not in found or not found[q].case.published]
            if missing:
                raise CaseNotFound(f"no published questions {missing}; publish their cases first")
            row = ClassSession(code=self._new_code(db), title=title.strip(), created_by=session.username, is_open=True,
                               items=[ClassSessionItem(position=k, question_id=q) for k, q in enumerate(ids)])  # fmt: skip
            db.add(row)
            db.flush()
            return _session_record(row, 0)

    def set_open(self, session: InstructorSession, code: str, is_open: bool) -> ClassSessionRecord:
        """Open or close a session (closed: nobody can join or answer)."""
        self.store._require(session)
        with self.store._writing() as db:
            row = self._by_code(db, code)
            row.is_open = is_open
            row.closed_at = None if is_open else utc_now()
            db.flush()
            return _session_record(row, self._n_students(db, row.id))

    def list_sessions(self, session: InstructorSession) -> tuple[ClassSessionRecord, ...]:
        """Every session, newest first (instructor only)."""
        self.store._require(session)
        with self.store._reading() as db:
            rows = db.scalars(select(ClassSession).order_by(ClassSession.created_at.desc(), ClassSession.id.desc()))
            return tuple(_session_record(r, self._n_students(db, r.id)) for r in rows)

    def results(self, session: InstructorSession, code: str) -> SessionResults:
        """Per-question and per-student results of a session (instructor only)."""
        self.store._require(session)
        with self.store._reading() as db:
            row = self._by_code(db, code)
            record = _session_record(row, self._n_students(db, row.id))
            answers = self._answers(db, row.id)
            questions = {q.id: q for q in db.scalars(select(Question).where(Question.id.in_(record.question_ids)))}
            students = list(db.scalars(select(ClassSessionStudent).where(ClassSessionStudent.session_id == row.id)
                                       .order_by(ClassSessionStudent.pseudonym)))  # fmt: skip
            stats = tuple(_question_stats(questions[q], [a for a in answers if a[1].question_id == q])
                          for q in record.question_ids)  # fmt: skip
            progress = tuple(_progress(s.pseudonym, [a for a in answers if a[0] == s.pseudonym], len(record.question_ids))
                             for s in students)  # fmt: skip
        return SessionResults(record, stats, progress)

    def answers(self, session: InstructorSession, code: str) -> tuple[SessionAnswerRow, ...]:
        """Every answer of a session, oldest first (instructor only)."""
        self.store._require(session)
        with self.store._reading() as db:
            row = self._by_code(db, code)
            kinds = dict(db.execute(select(Question.id, Question.kind)).tuples().all())
            return tuple(
                SessionAnswerRow(name, a.question_id, kinds.get(a.question_id, ""), attempt.answer, a.verdict,
                                 attempt.dice, attempt.iou, a.created_at)  # fmt: skip
                for name, a, attempt in self._answers(db, row.id)
            )

    def results_csv(self, session: InstructorSession, code: str) -> str:
        """The session's answers as CSV (cells a spreadsheet would run as formulas are quoted with ')."""
        rows = self.answers(session, code)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(("pseudonym", "question_id", "kind", "answer", "verdict", "dice", "iou", "created_at"))
        for r in rows:
            cells = (r.pseudonym, r.question_id, r.kind, r.answer, r.verdict or "",
                     "" if r.dice is None else f"{r.dice:.4f}", "" if r.iou is None else f"{r.iou:.4f}",
                     r.created_at.isoformat(timespec="seconds"))  # fmt: skip
            writer.writerow([_csv_safe(c) for c in cells])
        return buffer.getvalue()

    # ------------------------------------------------------------------------------------- students

    def join(self, code: str, pseudonym: str) -> ClassSessionRecord:
        """Join an open session under a pseudonym (joining again with the same pseudonym resumes)."""
        name = _check_pseudonym(pseudonym)
        with self.store._writing() as db:
            row = self._open_session(db, code)
            exists = db.scalar(select(ClassSessionStudent).where(ClassSessionStudent.session_id == row.id,
                                                                 ClassSessionStudent.pseudonym == name))  # fmt: skip
            if exists is None:
                try:
                    with db.begin_nested():
                        db.add(ClassSessionStudent(session_id=row.id, pseudonym=name))
                except IntegrityError:  # joined at the same moment in another tab: already there
                    pass
            return _session_record(row, 0)

    def answered(self, code: str, pseudonym: str) -> dict[int, str | None]:
        """question id → verdict (None for drawings) of what this pseudonym has answered in the session."""
        with self.store._reading() as db:
            row = self._by_code(db, code)
            return {a.question_id: a.verdict for name, a, _ in self._answers(db, row.id) if name == pseudonym.strip()}

    def answer(self, code: str, pseudonym: str, question_id: int, answer: str = "",
               drawn_mask: np.ndarray | None = None, duration_s: float | None = None) -> AttemptRecord:  # fmt: skip
        """Mark and store one answer of a joined student; each question is answered once per session."""
        name = _check_pseudonym(pseudonym)
        with self.store._reading() as db:
            row = self._open_session(db, code)
            student = db.scalar(select(ClassSessionStudent).where(ClassSessionStudent.session_id == row.id,
                                                                  ClassSessionStudent.pseudonym == name))  # fmt: skip
            if student is None:
                raise PermissionDenied(f"join session {row.code} first (with the same pseudonym)")
            if question_id not in {item.question_id for item in row.items}:
                raise CaseNotFound(f"question {question_id} is not part of session {row.code}")
            if db.scalar(select(ClassSessionAnswer.id).where(ClassSessionAnswer.student_id == student.id,
                                                             ClassSessionAnswer.question_id == question_id)):  # fmt: skip
                raise InvalidCaseData("you have already answered this question in this session")
            session_id, student_id = row.id, student.id
        attempt = self.store.record_attempt(question_id, name, answer, drawn_mask, duration_s)
        with self.store._writing() as db:
            db.add(ClassSessionAnswer(session_id=session_id, student_id=student_id, attempt_id=attempt.id,
                                      question_id=question_id, verdict=attempt.verdict))  # fmt: skip
        return attempt

    def question(self, question_id: int, *, published_only: bool = True) -> QuestionRecord:
        """One question by id in one query (published cases only unless told otherwise)."""
        with self.store._reading() as db:
            row = db.get(Question, int(question_id))
            if row is None or (published_only and not row.case.published):
                raise CaseNotFound(f"no published question {question_id}")
            return question_record(row)

    def session_questions(self, code: str) -> tuple[QuestionRecord, ...]:
        """The questions of a session in quiz order (what a joined student sees)."""
        with self.store._reading() as db:
            row = self._by_code(db, code)
            ids = [item.question_id for item in row.items]
            found = {q.id: q for q in db.scalars(select(Question).where(Question.id.in_(ids)))}
            return tuple(question_record(found[q]) for q in ids if q in found)

    # ------------------------------------------------------------------------------------- helpers

    @staticmethod
    def _new_code(db) -> str:
        for _ in range(20):
            code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
            if db.scalar(select(ClassSession.id).where(ClassSession.code == code)) is None:
                return code
        raise InvalidCaseData("could not find a free session code; try again")

    @staticmethod
    def _by_code(db, code: str) -> ClassSession:
        row = db.scalar(select(ClassSession).where(ClassSession.code == (code or "").strip().upper()))
        if row is None:
            raise CaseNotFound(f"no class session with code {code!r}; check the code your instructor gave")
        return row

    def _open_session(self, db, code: str) -> ClassSession:
        row = self._by_code(db, code)
        if not row.is_open:
            raise PermissionDenied(f"class session {row.code} is closed")
        return row

    @staticmethod
    def _n_students(db, session_id: int) -> int:
        return len(list(db.scalars(select(ClassSessionStudent.id).where(ClassSessionStudent.session_id == session_id))))

    @staticmethod
    def _answers(db, session_id: int) -> list[tuple[str, ClassSessionAnswer, Attempt]]:
        rows = db.execute(
            select(ClassSessionStudent.pseudonym, ClassSessionAnswer, Attempt)
            .join(ClassSessionStudent, ClassSessionAnswer.student_id == ClassSessionStudent.id)
            .join(Attempt, ClassSessionAnswer.attempt_id == Attempt.id)
            .where(ClassSessionAnswer.session_id == session_id)
            .order_by(ClassSessionAnswer.created_at, ClassSessionAnswer.id)
        )
        return [tuple(r) for r in rows]


def _check_pseudonym(pseudonym: str) -> str:
    name = (pseudonym or "").strip()
    if not STUDENT_ID_PATTERN.match(name):
        raise InvalidCaseData("pseudonyms are 1-80 letters, digits, '.', '_' or '-' (never your real name)")
    return name


def _session_record(row: ClassSession, n_students: int) -> ClassSessionRecord:
    return ClassSessionRecord(
        id=row.id, code=row.code, title=row.title, created_by=row.created_by, is_open=bool(row.is_open),
        created_at=row.created_at, question_ids=tuple(i.question_id for i in row.items), n_students=n_students,
    )  # fmt: skip


def _question_stats(question: Question, answers: list[tuple[str, ClassSessionAnswer, Attempt]]) -> QuestionStats:
    verdicts = [a.verdict for _, a, _ in answers if a.verdict is not None]
    n = len(answers)

    def share(v: str) -> float | None:
        return None if not verdicts else verdicts.count(v) / len(verdicts)

    wrong = Counter(normalise(t.answer) for _, a, t in answers if a.verdict == WRONG and t.answer.strip())
    return QuestionStats(
        question_id=question.id, case_id=question.case_id, kind=question.kind, prompt=question.prompt,
        reference_answer=question.reference_answer, n_answers=n, share_correct=share(CORRECT),
        share_partly=share(PARTLY), share_wrong=share(WRONG),
        dice=tuple(t.dice for _, _, t in answers if t.dice is not None),
        iou=tuple(t.iou for _, _, t in answers if t.iou is not None),
        common_wrong=tuple(wrong.most_common(TOP_WRONG_ANSWERS)),
    )  # fmt: skip


def _progress(pseudonym: str, answers: list[tuple[str, ClassSessionAnswer, Attempt]], total: int) -> StudentProgress:
    dice = [t.dice for _, _, t in answers if t.dice is not None]
    return StudentProgress(
        pseudonym=pseudonym, answered=len(answers), total=total,
        correct=sum(a.verdict == CORRECT for _, a, _ in answers), partly=sum(a.verdict == PARTLY for _, a, _ in answers),
        mean_dice=None if not dice else float(np.mean(dice)),
    )  # fmt: skip


def _csv_safe(value: object) -> object:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
