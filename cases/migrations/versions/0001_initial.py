"""Initial schema: cases, images, masks, questions, model outputs, attempts, instructors.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def _create_cases() -> None:
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("slug", sa.String(120), nullable=False, unique=True),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("modality", sa.String(40), nullable=False),
        sa.Column("anatomy", sa.String(80), nullable=False),
        sa.Column("plane", sa.String(40), nullable=False),
        sa.Column("difficulty", sa.String(40), nullable=False),
        sa.Column("vignette", sa.Text(), nullable=False),
        sa.Column("findings", sa.Text(), nullable=False),
        sa.Column("discussion", sa.Text(), nullable=False),
        sa.Column("key_points", sa.JSON(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("window_preset", sa.String(40), nullable=True),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("provenance", sa.Text(), nullable=False),
        sa.Column("licence", sa.String(120), nullable=False),
        sa.Column("synthetic", sa.Boolean(), nullable=False),
        sa.Column("published", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    for column in ("modality", "anatomy", "published"):
        op.create_index(f"ix_cases_{column}", "cases", [column])


def _create_images_and_masks() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("case_id", sa.Integer(), sa.ForeignKey("cases.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(200), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("spacing_row_mm", sa.Float(), nullable=True),
        sa.Column("spacing_col_mm", sa.Float(), nullable=True),
    )
    op.create_index("ix_images_case_id", "images", ["case_id"])
    op.create_table(
        "masks",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
        sa.Column("label", sa.String(80), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_masks_image_id", "masks", ["image_id"])


def _create_questions_and_outputs() -> None:
    op.create_table(
        "questions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("case_id", sa.Integer(), sa.ForeignKey("cases.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("reference_answer", sa.Text(), nullable=False),
        sa.Column("synonyms", sa.JSON(), nullable=False),
        sa.Column("choices", sa.JSON(), nullable=False),
        sa.Column("target_label", sa.String(80), nullable=True),
        sa.Column("region_png", sa.LargeBinary(), nullable=True),
    )
    op.create_index("ix_questions_case_id", "questions", ["case_id"])
    op.create_table(
        "model_outputs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "question_id", sa.Integer(), sa.ForeignKey("questions.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("revision", sa.String(80), nullable=True),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("mask_png", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_model_outputs_question_id", "model_outputs", ["question_id"])


def _create_attempts_and_instructors() -> None:
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "question_id", sa.Integer(), sa.ForeignKey("questions.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("student", sa.String(80), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("correct", sa.Boolean(), nullable=True),
        sa.Column("mask_png", sa.LargeBinary(), nullable=True),
        sa.Column("dice", sa.Float(), nullable=True),
        sa.Column("iou", sa.Float(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_attempts_question_id", "attempts", ["question_id"])
    op.create_index("ix_attempts_student", "attempts", ["student"])
    op.create_table(
        "instructors",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("username", sa.String(80), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(300), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )


def upgrade() -> None:
    _create_cases()
    _create_images_and_masks()
    _create_questions_and_outputs()
    _create_attempts_and_instructors()


def downgrade() -> None:
    for table in ("instructors", "attempts", "model_outputs", "questions", "masks", "images", "cases"):
        op.drop_table(table)
