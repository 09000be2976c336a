"""Alembic environment: always run online on the connection handed in by `cases.store`.

There is no alembic.ini: `cases.store.upgrade_schema` builds the Config in code and passes an open
connection in `config.attributes["connection"]`.
"""

from __future__ import annotations

from alembic import context

from cases.models import Base


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "cases migrations run only through cases.store.upgrade_schema(engine); there is no alembic.ini"
        )
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite has almost no ALTER TABLE: use move-and-copy batches
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported for the case library")
run_migrations_online()
