"""Raw uploads leave the server as soon as they are read.

A raw upload keeps what the pixels do not need and may identify a patient (PNG text chunks, EXIF, the DICOM
header, the file name). Gradio keeps every upload in its cache folder, where anyone with the URL can fetch it,
until its cache sweep; `discard` deletes it right after it was read (or refused), so it is never served again.
Only files inside Gradio's upload folder are deleted, and never a copy of a bundled example image.

The Instructor tab reads an upload more than once (another slice, frame or plane), so `PrivateUploads.take`
moves it instead: its bytes go to a private file (0600, random name) in a folder of the portal's own (0700,
outside Gradio's cache and every served path), and the cached upload is deleted at once. A session keeps one
such file: it is deleted when the session takes a new upload, saves its case, closes its tab, or stays idle
past the time to live, and the folder goes when the server stops.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gradio.utils import get_cache_folder, get_upload_folder

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


class UploadGone(Exception):
    """The file named by the upload component is no longer on the server and this session holds no copy."""


@dataclass(frozen=True)
class _Kept:
    upload: str  # the Gradio cache path it came from (already deleted), to recognise later re-reads
    private: Path
    last_used: float


class PrivateUploads:
    """One private copy of the last raw upload per session, for handlers that read it again. Thread-safe."""

    def __init__(
        self, *, parent: Path | None = None, max_idle_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """parent: where the private folder is made (default: the system temp folder; never Gradio's cache)."""
        if max_idle_s <= 0:
            raise ValueError("max_idle_s must be positive")
        self.parent, self.max_idle_s, self._clock = parent, max_idle_s, clock
        self._folder: Path | None = None
        self._kept: dict[str, _Kept] = {}
        self._lock = threading.Lock()

    def take(self, owner: str, upload: str | Path) -> Path:
        """The private copy to read for `upload` (the upload component's value) in session `owner`.

        A file still on disk is a new upload: its bytes move to a new private file (replacing the session's
        previous one) and the cached file is deleted. A file already taken by this session gives its private
        copy. Raises UploadGone otherwise (e.g. the copy was released, or another session's file).
        """
        source = Path(upload)
        with self._lock:
            self._expire()
            kept = self._kept.get(owner)
            if source.is_file():
                private = self._copy_quietly(source)
                discard(source)
                self._replace(owner, _Kept(str(source), private, self._clock()))
                return private
            if kept is None or kept.upload != str(source) or not kept.private.is_file():
                raise UploadGone()
            self._kept[owner] = _Kept(kept.upload, kept.private, self._clock())
            return kept.private

    def release(self, owner: str | None) -> None:
        """Delete the session's private copy (its case was saved, or its tab closed)."""
        if owner is None:
            return
        with self._lock:
            self._replace(owner, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)

    def _replace(self, owner: str, kept: _Kept | None) -> None:
        old = self._kept.pop(owner, None)
        if old is not None:
            old.private.unlink(missing_ok=True)
        if kept is not None:
            self._kept[owner] = kept

    def _expire(self) -> None:
        now = self._clock()
        for owner in [o for o, k in self._kept.items() if now - k.last_used > self.max_idle_s]:
            self._replace(owner, None)

    def _copy_quietly(self, source: Path) -> Path:
        """`_copy`, with errors that never carry a file name (the upload's name may identify a patient)."""
        try:
            return self._copy(source)
        except FileNotFoundError:
            raise UploadGone() from None
        except OSError as err:
            raise OSError(err.errno, err.strerror) from None

    def _copy(self, source: Path) -> Path:
        """The bytes of source in a new 0600 file with a random name (the suffix only for NIfTI)."""
        name = source.name.lower()
        suffix = ".nii.gz" if name.endswith(".nii.gz") else ".nii" if name.endswith(".nii") else ""
        private = self._private_folder() / f"{secrets.token_hex(16)}{suffix}"
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, 2**20)
        except BaseException:
            private.unlink(missing_ok=True)
            raise
        return private

    def _private_folder(self) -> Path:
        if self._folder is None or not self._folder.is_dir():
            parent = Path(self.parent) if self.parent is not None else Path(tempfile.gettempdir())
            folder = Path(tempfile.mkdtemp(prefix="medplib-private-uploads-", dir=parent)).resolve()  # 0700
            if any(_inside(folder, Path(p)) for p in (get_upload_folder(), get_cache_folder())):
                shutil.rmtree(folder, ignore_errors=True)
                raise RuntimeError("the private upload folder would be served by Gradio: set spill_dir elsewhere")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            self._folder = folder
        return self._folder


def _inside(path: Path, root: Path) -> bool:
    root = root.resolve()
    return path == root or root in path.parents
