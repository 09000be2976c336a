"""Shared fixtures: the golden reference folder beside the repo, and a tiny random checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN = REPO_ROOT.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "tiny-medplib-ref" / "config.json").is_file():
        pytest.skip("the golden fixtures (../shared/golden) are not beside this checkout")
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, golden_dir: Path) -> Path:
    """A tiny random MedPLIB written in the released layout (tokenizer: the golden 1000-piece model)."""
    from engine.presets import random_model, tiny_config, write_checkpoint

    folder = tmp_path_factory.mktemp("tiny-random")
    model = random_model(tiny_config(vocab_size=1267), seed=7)
    return write_checkpoint(model, folder, sp_model=golden_dir / "tiny-medplib-ref" / "tokenizer.model")
