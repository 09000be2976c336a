"""The starter library: the case folders of cases/library (see cases.casefolder for their format).

Each starter case is a folder with a `case.json` (teaching text, questions and answer keys) whose images
and masks are files of the shipped image set (`asset:` paths into assets/medimages). A teacher adds a
case by adding a folder; `python -m cases validate cases/library` checks them all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cases.casefolder import ASSETS_DIR, LIBRARY_DIR, read_library
from cases.records import CaseDraft

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"


def starter_drafts(library: Path = LIBRARY_DIR, assets_dir: Path = ASSETS_DIR) -> tuple[CaseDraft, ...]:
    """The starter cases as drafts (published), read from the case folders under `library`.

    FileNotFoundError (saying how to regenerate it) when the shipped image set is missing.
    """
    if not (assets_dir / INDEX_NAME).is_file():
        raise FileNotFoundError(
            f"{assets_dir / INDEX_NAME} is missing; regenerate it with "
            "`python -m training.sources --out assets/medimages`"
        )
    return read_library(library, assets_dir)


def seed_starter_library(store: Any, assets_dir: Path = ASSETS_DIR, library: Path = LIBRARY_DIR) -> int:
    """Add the starter library to an empty store in one transaction; returns the number of cases."""
    try:
        drafts = starter_drafts(library, assets_dir)
    except FileNotFoundError as error:
        log.warning("starter library not seeded: %s", error)
        return 0
    store.create_cases(store.operator_session(), drafts)
    log.info("seeded the starter library: %d cases", len(drafts))
    return len(drafts)
