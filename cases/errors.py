"""Errors of the case library. Every message says what went wrong and what to do."""

from __future__ import annotations

import struct
import zlib

from PIL import Image as _PILImage
from pydicom.errors import BytesLengthException as _DicomLengthError


class CaseStoreError(Exception):
    """Base class: anything the case library refuses to do."""


class CaseNotFound(CaseStoreError, LookupError):
    """No (visible) case, question or image with that id."""


class PermissionDenied(CaseStoreError, PermissionError):
    """An instructor action without a valid instructor session."""


class InvalidCaseData(CaseStoreError, ValueError):
    """Input that would make a broken case: wrong sizes, empty fields, oversized images, bad kinds."""


class ArchiveError(CaseStoreError):
    """An export/import archive that cannot be written or read; nothing was written to the store."""


class DuplicateCase(ArchiveError):
    """An archive (or a new case) uses a slug that is already in the library."""


class LoginThrottled(PermissionDenied):
    """Too many failed logins from this client or for this account: wait `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PublishBlocked(PermissionDenied):
    """A case flagged for burned-in annotation cannot be published before an instructor's review."""


# What parsers of untrusted bytes (zip, JSON, PNG/JPEG, DICOM, NIfTI) may raise besides our own errors.
# Boundaries that read user files (archive import, instructor uploads) turn these into CaseStoreError.
UNTRUSTED_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, KeyError, IndexError, AttributeError, LookupError, OSError, EOFError,
    RuntimeError, OverflowError, MemoryError, ArithmeticError, struct.error,
    zlib.error, _PILImage.DecompressionBombError, _DicomLengthError, UnicodeError, AssertionError,
)  # fmt: skip
