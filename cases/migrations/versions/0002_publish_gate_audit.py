"""Publish gate for burned-in annotation (flag + who/when reviewed) and the instructor audit log.

Revision ID: 0002
Revises: 0001_initial
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.add_column(
            sa.Column("burned_in_review_required", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("burned_in_reviewed_by", sa.String(80), nullable=True))
        batch.add_column(sa.Column("burned_in_reviewed_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("cases") as batch:
        batch.alter_column("burned_in_review_required", server_default=None)
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(80), nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=True),
        sa.Column("case_slug", sa.String(120), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    for column in ("at", "actor", "case_id"):
        op.create_index(f"ix_audit_log_{column}", "audit_log", [column])


def downgrade() -> None:
    op.drop_table("audit_log")
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("burned_in_reviewed_at")
        batch.drop_column("burned_in_reviewed_by")
        batch.drop_column("burned_in_review_required")
