"""The starter library and the migrations: what a new database contains."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from cases import CaseStore
from cases.casefolder import ASSETS_DIR, LIBRARY_DIR, case_folders
from cases.db import current_revision, make_engine, upgrade_schema
from cases.models import Base
from cases.starter import starter_drafts

STARTER_CASES = 32  # case folders in cases/library

needs_assets = pytest.mark.skipif(
    not (ASSETS_DIR / "index.json").is_file(), reason="assets/medimages missing"
)


def head_revision() -> str:
    """The newest migration (whatever revision other branches add before ours)."""

    from cases.db import alembic_config

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_migrations_from_empty_to_head_match_the_models(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.sqlite'}")
    assert current_revision(engine) is None
    upgrade_schema(engine)
    assert current_revision(engine) == head_revision()
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []  # `alembic check`: the migrations give exactly the ORM schema
    upgrade_schema(engine)  # idempotent
    assert current_revision(engine) == head_revision()


def test_upgrade_and_downgrade_run_on_a_plain_engine(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'plain.sqlite'}")
    upgrade_schema(engine)
    upgrade_schema(engine, "head")
    from alembic import command

    from cases.db import alembic_config

    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert current_revision(engine) is None


@needs_assets
def test_starter_library_has_32_cases_in_7_modalities() -> None:
    drafts = starter_drafts()
    assert len(drafts) == STARTER_CASES == len(case_folders(LIBRARY_DIR)) and len({d.modality for d in drafts}) == 7
    for draft in drafts:
        kinds = [q.kind for q in draft.questions]
        assert len(kinds) >= 2 and "closed" in kinds and ("open" in kinds or "segmentation" in kinds)
        assert draft.images[0].masks and draft.licence and draft.provenance and draft.findings
        target = next(q.target_label for q in draft.questions if q.kind == "segmentation")
        assert any(m.label == target and m.mask.any() for m in draft.images[0].masks)
        if draft.synthetic:
            assert "SIMULATED" in draft.vignette and "SIMULATED" in draft.provenance


@needs_assets
def test_new_database_opens_with_the_starter_library(tmp_path: Path) -> None:
    store = CaseStore(str(tmp_path / "fresh.sqlite"))
    cases = store.list_cases()
    assert len(cases) == STARTER_CASES
    case = store.get_case(cases[0].id)
    assert case.images[0].rgb().ndim == 3 and case.summary.published
    reopened = CaseStore(str(tmp_path / "fresh.sqlite"))  # no second seeding
    assert len(reopened.list_cases()) == STARTER_CASES


def test_missing_assets_leave_an_empty_library_with_a_warning(tmp_path: Path, caplog) -> None:
    from cases.starter import seed_starter_library

    store = CaseStore(str(tmp_path / "e.sqlite"), seed_starter=False)
    assert seed_starter_library(store, tmp_path / "no-assets") == 0
    assert "regenerate it" in caplog.text
