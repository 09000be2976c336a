"""Class sessions (issue 21): create, 20 students join and answer, results and CSV, open/close; SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from cases import CaseNotFound, CaseStore, InvalidCaseData, PermissionDenied
from cases.classroom import Classroom
from cases.marking import AnswerKey
from cases.samples import sample_draft

PG_URL = os.environ.get("DATABASE_URL_PG")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CaseStore]:
    if request.param == "sqlite":
        s = CaseStore(str(tmp_path / "class.sqlite"), seed_starter=False)
        yield s
        s.close()
        return
    if not PG_URL:
        pytest.skip("PostgreSQL not configured: set DATABASE_URL_PG=postgresql+psycopg://user:pw@host/db")
    schema = f"t_{uuid.uuid4().hex[:10]}"  # a throw-away schema, dropped afterwards
    admin = create_engine(PG_URL)
    try:
        with admin.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as error:  # noqa: BLE001 - any connection failure means: skip
        pytest.skip(f"PostgreSQL not reachable: {type(error).__name__}")
    s = CaseStore(f"{PG_URL}?options=-csearch_path%3D{schema}", seed_starter=False)
    yield s
    s.close()
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def test_a_class_of_20_answers_and_the_instructor_reads_the_results(store: CaseStore) -> None:
    op = store.operator_session()
    case = store.create_case(op, sample_draft(size=(40, 40)))
    closed, seg, opened = case.questions
    store.set_answer_key(op, opened.id, AnswerKey(("round bright lesion",), (("bright",), ("round", "disc"))))
    room = Classroom(store)
    session = room.create_session(op, "Week 3", [q.id for q in case.questions])
    assert len(session.code) == 6 and session.is_open
    reference = case.images[0].mask("lesion").array()
    for k in range(20):
        name = f"student-{k:02d}"
        room.join(session.code.lower(), name)  # codes are case-insensitive
        room.answer(session.code, name, closed.id, "yes" if k % 4 else "no")
        drawn = reference.copy()
        drawn[: k % 5 * 4] = False
        room.answer(session.code, name, seg.id, "", drawn)
        room.answer(session.code, name, opened.id, ["a round bright disc", "bright", "dark streak"][k % 3])
    with pytest.raises(InvalidCaseData, match="already answered"):
        room.answer(session.code, "student-00", closed.id, "yes")
    results = room.results(op, session.code)
    by_id = {q.question_id: q for q in results.questions}
    assert by_id[closed.id].share_correct == pytest.approx(15 / 20)
    assert by_id[closed.id].common_wrong == (("no", 5),)
    assert len(by_id[seg.id].dice) == 20 and max(by_id[seg.id].dice) == 1.0
    assert by_id[opened.id].share_partly == pytest.approx(7 / 20)  # k % 3 == 1: "bright" only
    assert by_id[opened.id].common_wrong == (("dark streak", 6),)
    assert len(results.students) == 20 and all(s.answered == 3 for s in results.students)
    rows = list(csv.DictReader(io.StringIO(room.results_csv(op, session.code))))
    assert len(rows) == 60 and {r["verdict"] for r in rows} == {"correct", "partly correct", "wrong", ""}
    assert room.list_sessions(op)[0].n_students == 20


def test_closed_sessions_refuse_students_and_visitors_get_no_results(store: CaseStore) -> None:
    op = store.operator_session()
    case = store.create_case(op, sample_draft())
    room = Classroom(store)
    session = room.create_session(op, "Quiz", [case.questions[0].id])
    room.join(session.code, "early")
    with pytest.raises(PermissionDenied, match="join session"):
        room.answer(session.code, "never-joined", case.questions[0].id, "yes")
    room.set_open(op, session.code, False)
    with pytest.raises(PermissionDenied, match="closed"):
        room.join(session.code, "late")
    with pytest.raises(PermissionDenied, match="closed"):
        room.answer(session.code, "early", case.questions[0].id, "yes")
    with pytest.raises(PermissionDenied):
        room.results(None, session.code)  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied):
        room.create_session(None, "x", [case.questions[0].id])  # type: ignore[arg-type]
    with pytest.raises(CaseNotFound, match="no class session"):
        room.join("ZZZZZZ", "someone")
    with pytest.raises(InvalidCaseData, match="pseudonyms"):
        room.join(session.code, "Real Name With Spaces")
    assert np.isfinite(len(room.answered(session.code, "early")))
