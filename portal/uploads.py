"""Raw uploads leave the server as soon as they are read.

A raw upload keeps what the pixels do not need and may identify a patient (PNG text chunks, EXIF, the DICOM
header, the file name). Gradio keeps every upload in its cache folder, where anyone with the URL can fetch it,
until its cache sweep; `discard` deletes it right after it was read (or refused), so it is never served again.
Only files inside Gradio's upload folder are deleted, and never a copy of a bundled example image.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from gradio.utils import get_upload_folder

logger = logging.getLogger(__name__)


def discard(path: str | Path, keep_under: Path | None = None) -> bool:
    """Delete an upload from Gradio's cache (and its folder, when empty). Returns whether it was deleted.

    keep_under: the bundled examples folder; a cached copy of one of its images (same name and bytes) stays.
    """
    path = Path(path)
    if not _in_upload_folder(path) or _is_example_copy(path, keep_under):
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as err:  # never fail an upload because the cache could not be cleaned; say so once
        logger.warning("could not delete a raw upload from the cache (%s)", type(err).__name__)
        return False
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # Gradio puts each upload in its own hash-named folder
    return True


def _in_upload_folder(path: Path) -> bool:
    root = Path(get_upload_folder()).resolve()
    try:
        resolved = path.resolve()
    except OSError:
        return False
    return resolved != root and root in resolved.parents and resolved.is_file()


def _is_example_copy(path: Path, examples_dir: Path | None) -> bool:
    if examples_dir is None:
        return False
    for candidate in examples_dir.rglob(path.name):
        same_size = candidate.is_file() and candidate.stat().st_size == path.stat().st_size
        if same_size and candidate.read_bytes() == path.read_bytes():
            return True
    return False
