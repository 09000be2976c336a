"""Repository tests of cases.CaseStore on SQLite (and PostgreSQL when DATABASE_URL_PG is set)."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from cases import (
    CaseNotFound,
    CaseStore,
    DuplicateCase,
    ImageDraft,
    InvalidCaseData,
    MaskDraft,
    PermissionDenied,
)
from cases.db import alembic_config, current_revision
from cases.records import InstructorSession
from cases.samples import disc_mask, sample_draft
from cases.throttle import LoginThrottle

PASSWORD = "correct horse battery"


def head_revision() -> str:
    """The newest migration (whatever revision other branches add before ours)."""


    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _pg_url() -> str | None:
    url = os.environ.get("DATABASE_URL_PG")
    if not url:
        return None
    try:
        with create_engine(url).connect() as connection:
            connection.execute(text("select 1"))
    except Exception:  # noqa: BLE001 - any connection failure means "no server": skip
        return None
    return url


def _fresh_pg_url(url: str) -> Iterator[str]:
    """A throw-away schema on the PostgreSQL server (search_path), dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:10]}"
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in url else "?"
    yield f"{url}{sep}options=-csearch_path%3D{schema}"
    with engine.begin() as connection:
        connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CaseStore]:
    if request.param == "sqlite":
        s = CaseStore(str(tmp_path / "cases.sqlite"), seed_starter=False)
        yield s
        s.close()
        return
    url = _pg_url()
    if url is None:
        pytest.skip("PostgreSQL not reachable: set DATABASE_URL_PG=postgresql+psycopg://user:pw@host/db")
    for scoped in _fresh_pg_url(url):
        s = CaseStore(scoped, seed_starter=False)
        yield s
        s.close()


@pytest.fixture
def operator(store: CaseStore) -> InstructorSession:
    return store.operator_session()


def test_new_database_is_migrated_to_head(store: CaseStore) -> None:
    assert current_revision(store.engine) == head_revision()
    tables = set(inspect(store.engine).get_table_names())
    assert {"cases", "images", "masks", "questions", "model_outputs", "attempts", "instructors", "audit_log"} <= tables


def test_created_case_reads_back_with_pixels_masks_and_questions(store: CaseStore, operator) -> None:
    draft = sample_draft()
    created = store.create_case(operator, draft)
    case = store.get_case(created.summary.slug)
    assert case.summary.n_masks == 1 and case.summary.n_questions == 3
    np.testing.assert_array_equal(case.images[0].rgb()[..., 0], draft.images[0].pixels)
    np.testing.assert_array_equal(case.images[0].mask("lesion").array(), draft.images[0].masks[0].mask)
    assert case.images[0].spacing_mm == (0.5, 0.5)
    assert [q.kind for q in case.questions] == ["closed", "segmentation", "open"]


def test_unpublished_cases_are_hidden_from_anonymous_users(store: CaseStore, operator) -> None:
    hidden = store.create_case(operator, sample_draft("Draft case", published=False))
    assert store.list_cases() == ()
    with pytest.raises(CaseNotFound):
        store.get_case(hidden.id)
    assert store.get_case(hidden.id, operator).title == "Draft case"
    store.set_published(operator, hidden.id, True)
    assert [c.title for c in store.list_cases()] == ["Draft case"]


def test_filters_and_free_text_search(store: CaseStore, operator) -> None:
    store.create_case(operator, sample_draft("Alpha MR case"))
    store.create_case(operator, sample_draft("Beta CT case", modality="CT"))
    assert [c.title for c in store.list_cases(modality="CT")] == ["Beta CT case"]
    assert [c.title for c in store.list_cases(text="alpha")] == ["Alpha MR case"]
    assert len(store.list_cases(text="bright round")) == 2  # findings text
    assert store.list_cases(text="100%") == ()  # LIKE wildcards are escaped
    assert store.facets()["modality"] == ("CT", "MR")


def test_sql_looking_text_is_stored_verbatim(store: CaseStore, operator) -> None:
    evil = "Robert'); DROP TABLE cases;--"
    created = store.create_case(operator, sample_draft(evil))
    assert store.get_case(created.id).title == evil
    assert [c.title for c in store.list_cases(text="DROP TABLE")] == [evil]
    attempt = store.record_attempt(created.questions[0].id, "anon-1", "'; DELETE FROM attempts; --")
    assert store.student_attempts("anon-1")[0].answer == attempt.answer


def test_instructor_actions_are_refused_to_anonymous_users(store: CaseStore, operator) -> None:
    case = store.create_case(operator, sample_draft())
    forged = InstructorSession(username="operator (local)", token="guess", expires_at=operator.expires_at)
    for session in (None, forged):
        with pytest.raises(PermissionDenied):
            store.create_case(session, sample_draft("x"))  # type: ignore[arg-type]
        with pytest.raises(PermissionDenied):
            store.set_published(session, case.id, False)  # type: ignore[arg-type]
        with pytest.raises(PermissionDenied):
            store.delete_case(session, case.id)  # type: ignore[arg-type]
        with pytest.raises(PermissionDenied):
            store.attempts_csv(session)  # type: ignore[arg-type]
    assert store.get_case(case.id).summary.published


def test_login_logout_and_password_check(store: CaseStore, operator) -> None:
    store.create_instructor(operator, "teacher", PASSWORD)
    with pytest.raises(PermissionDenied):
        store.login("teacher", "wrong password!")
    with pytest.raises(PermissionDenied):
        store.login("nobody", PASSWORD)
    session = store.login("teacher", PASSWORD)
    assert store.is_instructor(session)
    store.create_case(session, sample_draft())
    store.logout(session)
    with pytest.raises(PermissionDenied):
        store.create_case(session, sample_draft("after logout"))
    store.throttle = LoginThrottle(clock=lambda: 1000.0)  # frozen time: the back-off cannot elapse
    for _ in range(3):
        with pytest.raises(PermissionDenied, match="wrong"):
            store.login("teacher", "guessing123", client="10.0.0.9")
    with pytest.raises(PermissionDenied, match="too many failed logins"):
        store.login("teacher", "guessing123", client="10.0.0.9")  # slowed down, not locked out


def test_quiz_attempt_scores_dice_and_iou(store: CaseStore, operator) -> None:
    case = store.create_case(operator, sample_draft(size=(40, 40)))
    seg = next(q for q in case.questions if q.kind == "segmentation")
    reference = case.images[0].mask("lesion").array()
    drawn = np.zeros_like(reference)
    drawn[:, :20] = reference[:, :20]  # the left half of the lesion
    attempt = store.record_attempt(seg.id, "anon-7", "", drawn, duration_s=12.5)
    a, b = int(drawn.sum()), int(reference.sum())
    assert attempt.dice == pytest.approx(2 * a / (a + b))
    assert attempt.iou == pytest.approx(a / b)
    closed = store.record_attempt(case.questions[0].id, "anon-7", "Yes")
    opened = store.record_attempt(case.questions[2].id, "anon-7", "something else")
    assert closed.correct is True and opened.correct is False and opened.verdict == "wrong"  # issue 21
    assert [x.id for x in store.student_attempts("anon-7")] == [attempt.id, closed.id, opened.id]


def test_bad_inputs_are_refused_with_clear_errors(store: CaseStore, operator) -> None:
    draft = sample_draft(size=(32, 32))
    wrong = ImageDraft(draft.images[0].pixels, (MaskDraft("lesion", np.zeros((31, 32), bool)),))
    with pytest.raises(InvalidCaseData, match="image's size"):
        store.create_case(operator, sample_draft().__class__(**{**draft.__dict__, "images": (wrong,)}))
    huge = ImageDraft(np.zeros((5000, 10), np.uint8))
    with pytest.raises(InvalidCaseData, match="limit"):
        store.create_case(operator, draft.__class__(**{**draft.__dict__, "images": (huge,)}))
    case = store.create_case(operator, sample_draft(slug="fixed-slug"))
    with pytest.raises(DuplicateCase):
        store.create_case(operator, sample_draft(slug="fixed-slug"))
    with pytest.raises(InvalidCaseData, match="image size"):
        store.record_attempt(case.questions[1].id, "anon", "", np.zeros((3, 3), bool))
    with pytest.raises(InvalidCaseData, match="student ids"):
        store.record_attempt(case.questions[1].id, "Jane Doe <jane@x>", "")
    assert len(store.list_cases()) == 1


def test_update_replaces_content_and_delete_cascades(store: CaseStore, operator) -> None:
    case = store.create_case(operator, sample_draft())
    store.record_attempt(case.questions[0].id, "anon", "yes")
    updated = store.update_case(operator, case.id, sample_draft("Renamed", size=(20, 20)))
    assert (updated.id, updated.summary.slug, updated.title) == (case.id, case.summary.slug, "Renamed")
    assert updated.images[0].height == 20
    store.delete_case(operator, case.id)
    assert store.list_cases(include_unpublished=True) == ()
    with store.engine.connect() as connection:
        for table in ("images", "masks", "questions", "attempts"):
            assert connection.execute(text(f"select count(*) from {table}")).scalar() == 0


def test_cached_model_outputs(store: CaseStore, operator) -> None:
    case = store.create_case(operator, sample_draft(size=(24, 24)))
    mask = disc_mask(24, 24, (12, 12), 4)
    saved = store.save_model_output(
        operator, case.questions[1].id, model_id="tiny", revision="r1",
        parameters={"temperature": 0.0}, answer="It is the lesion.", mask=mask,
    )  # fmt: skip
    [output] = store.model_outputs(case.questions[1].id)
    assert output == saved
    np.testing.assert_array_equal(output.mask(), mask)
    with pytest.raises(PermissionDenied):
        store.save_model_output(
            None, case.questions[1].id, model_id="x", revision=None, parameters={}, answer="", mask=None
        )  # type: ignore[arg-type]


def test_sqlite_connection_settings_and_foreign_keys(tmp_path: Path) -> None:
    store = CaseStore(str(tmp_path / "c.sqlite"), seed_starter=False)
    with store.engine.connect() as connection:
        pragmas = {
            p: connection.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "foreign_keys")
        }
        assert pragmas == {"journal_mode": "wal", "foreign_keys": 1}
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(text("insert into masks (image_id, label, png) values (999, 'x', x'00')"))


def test_sqlite_backup_is_a_complete_copy(tmp_path: Path) -> None:
    store = CaseStore(str(tmp_path / "c.sqlite"), seed_starter=False)
    store.create_case(store.operator_session(), sample_draft())
    copy = store.backup(tmp_path / "backup" / "copy.sqlite")
    with sqlite3.connect(copy) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert [c.title for c in CaseStore(str(copy), seed_starter=False).list_cases()] == [
        "Synthetic disc lesion"
    ]
    with pytest.raises(InvalidCaseData, match="already exists"):
        store.backup(copy)


def test_default_path_is_relative_var_folder() -> None:
    from cases import DEFAULT_DB_PATH

    assert Path("var") / "medplib_cases.sqlite" == DEFAULT_DB_PATH


def test_savepoint_rollback_inside_a_transaction_works(tmp_path: Path) -> None:
    """Pins the Python 3.11 sqlite3 legacy-transaction bug: without our BEGIN hook SAVEPOINT misbehaves."""
    store = CaseStore(str(tmp_path / "sp.sqlite"), seed_starter=False)
    with store.engine.begin() as connection:
        connection.execute(
            text(
                "insert into instructors (username, password_hash, created_at) values ('a', 'x', '2026-01-01')"
            )
        )
        nested = connection.begin_nested()
        connection.execute(
            text(
                "insert into instructors (username, password_hash, created_at) values ('b', 'x', '2026-01-01')"
            )
        )
        nested.rollback()
    with store.engine.connect() as connection:
        assert connection.execute(text("select username from instructors")).scalars().all() == ["a"]


def _write_attempts(args: tuple[str, int, int]) -> int:
    url, question_id, n = args
    store = CaseStore(url, seed_starter=False)
    for i in range(n):
        store.record_attempt(question_id, f"proc-{os.getpid()}-{i}", "yes")  # under the per-student rate limit
    store.close()
    return n


def test_concurrent_writer_processes_lose_nothing(tmp_path: Path) -> None:
    import multiprocessing

    url = str(tmp_path / "busy.sqlite")
    store = CaseStore(url, seed_starter=False)
    case = store.create_case(store.operator_session(), sample_draft())
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        written = sum(pool.map(_write_attempts, [(url, case.questions[0].id, 50)] * 4))
    assert written == 200 == len(store.all_attempts(store.operator_session()))
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
