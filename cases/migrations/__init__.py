"""Alembic migrations of the case library; run programmatically by `cases.store.upgrade_schema`."""
