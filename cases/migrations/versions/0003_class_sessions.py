"""Answer keys and class sessions: new tables only (no existing table changes).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("class_session_answers", "class_session_students", "class_session_items", "class_sessions", "answer_keys")


def _fk(target: str) -> sa.ForeignKey:
    return sa.ForeignKey(target, ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "answer_keys",
        sa.Column("question_id", sa.Integer(), _fk("questions.id"), primary_key=True),
        sa.Column("key", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "class_sessions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("code", sa.String(12), nullable=False, unique=True),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("created_by", sa.String(80), nullable=False),
        sa.Column("is_open", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("closed_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "class_session_items",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("session_id", sa.Integer(), _fk("class_sessions.id"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("question_id", sa.Integer(), _fk("questions.id"), nullable=False),
    )
    op.create_index("ix_class_session_items_session_id", "class_session_items", ["session_id"])
    op.create_index("ix_class_session_items_question_id", "class_session_items", ["question_id"])
    op.create_table(
        "class_session_students",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("session_id", sa.Integer(), _fk("class_sessions.id"), nullable=False),
        sa.Column("pseudonym", sa.String(80), nullable=False),
        sa.Column("joined_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("session_id", "pseudonym", name="uq_class_session_students_pseudonym"),
    )
    op.create_index("ix_class_session_students_session_id", "class_session_students", ["session_id"])
    op.create_table(
        "class_session_answers",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("session_id", sa.Integer(), _fk("class_sessions.id"), nullable=False),
        sa.Column("student_id", sa.Integer(), _fk("class_session_students.id"), nullable=False),
        sa.Column("attempt_id", sa.Integer(), _fk("attempts.id"), nullable=False, unique=True),
        sa.Column("question_id", sa.Integer(), _fk("questions.id"), nullable=False),
        sa.Column("verdict", sa.String(20), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    for column in ("session_id", "student_id", "question_id"):
        op.create_index(f"ix_class_session_answers_{column}", "class_session_answers", [column])


def downgrade() -> None:
    for table in TABLES:
        op.drop_table(table)
