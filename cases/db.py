"""Engine creation and schema migration for any SQLAlchemy URL (SQLite tuned for durability).

SQLite settings (every pooled connection): WAL journal, foreign keys ON, busy_timeout, synchronous=FULL.
Python 3.11's sqlite3 driver runs its own legacy transaction control, which breaks SAVEPOINT and
transactional DDL; following the SQLAlchemy pysqlite docs we switch it off on connect and emit BEGIN
ourselves (BEGIN IMMEDIATE for writers, so they never fail upgrading a read lock).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

DEFAULT_DB_PATH = Path("var") / "medplib_cases.sqlite"  # relative to the working directory; git-ignored
SQLITE_BUSY_TIMEOUT_MS = 5000
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
IMMEDIATE_OPTION = "cases_sqlite_immediate"


def resolve_url(url: str | None) -> str:
    """A SQLAlchemy URL from a URL, a plain file path, or None (→ DEFAULT_DB_PATH as SQLite)."""
    if url is None or url == "":
        return f"sqlite:///{DEFAULT_DB_PATH}"
    if "://" not in url:
        return f"sqlite:///{url}"
    return url


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str) -> Engine:
    """Create the engine for `url`; SQLite files get their folder created and the pragmas above."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    database = parsed.database or ""
    if database in ("", ":memory:"):
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        make_private_sqlite_file(Path(database))
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    _install_sqlite_hooks(engine)
    return engine


def make_private_sqlite_file(path: Path) -> None:
    """The database file (and the -wal / -shm files SQLite creates with its mode) readable by the server's user
    only: 0600 files; a folder created here is 0700. Student answers are personal data."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if name.exists():
            os.chmod(name, 0o600)


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(IMMEDIATE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def alembic_config() -> Config:
    """Alembic Config built in code (there is no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at, or None for an empty database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_schema(engine: Engine, revision: str = "head") -> None:
    """Run `alembic upgrade <revision>` on this engine in one transaction."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    log.info("case library schema at %s", current_revision(engine))
