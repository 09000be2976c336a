"""Export and import of case archives: a zip of case folders (the cases.casefolder format) + a manifest.

Layout (schema version 2):
    manifest.json                 {"schema_version": 2, "format": "medplib-cases", "cases": ["cases/<slug>", ...]}
    cases/<slug>/case.json        the case file, exactly as in a library folder (one schema, one reader)
    cases/<slug>/image-<i>.png    (H, W, 3) RGB; image-<i>--mask-<j>.png (+ .nii.gz with nifti_masks),
                                  question-<k>--region.png, question-<k>--output-<m>.png

Import validates everything (schema version, files present, sizes, duplicate slugs) before one
all-or-nothing transaction, so a rejected archive writes nothing. Quiz attempts are never exported.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cases.casefolder import CASE_FILE, draft_from_entry, dump_entry, entry_from_record, safe_relative
from cases.errors import ArchiveError, CaseStoreError, DuplicateCase, InvalidCaseData
from cases.records import CaseDraft, InstructorSession

SCHEMA_VERSION = 2  # 2: one case.json per folder (cases.casefolder)
FORMAT_NAME = "medplib-cases"
MANIFEST = "manifest.json"
MAX_MEMBER_BYTES = 32 * 1024 * 1024  # per zip member, checked before reading (zip bombs)
MAX_ARCHIVE_MEMBERS = 20_000


def export_archive(
    store: Any, session: InstructorSession, out: Path, cases: Iterable[int | str] = (), *, nifti_masks: bool = False
) -> int:
    """Write the chosen cases (default: all, unpublished included) to `out`; returns the case count.

    nifti_masks: also carry every reference mask as NIfTI (`.nii.gz`, pixel spacing as voxel size).
    """
    ids = list(cases) or [c.id for c in store.list_cases(include_unpublished=True)]
    records = [store.get_case(case_id, session) for case_id in ids]
    out = Path(out)
    if out.exists():
        raise ArchiveError(f"{out} already exists; choose a new file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"schema_version": SCHEMA_VERSION, "format": FORMAT_NAME, "cases": []}
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for record in records:
            folder = f"cases/{record.summary.slug}"
            outputs = {q.id: store.model_outputs(q.id) for q in record.questions}
            entry = entry_from_record(
                record, outputs, lambda name, data, f=folder: archive.writestr(f"{f}/{name}", data),
                nifti_masks=nifti_masks,
            )  # fmt: skip
            archive.writestr(f"{folder}/{CASE_FILE}", dump_entry(entry))
            manifest["cases"].append(folder)
        archive.writestr(MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))
    return len(records)


def read_archive(path: Path) -> tuple[CaseDraft, ...]:
    """Parse and validate an archive into drafts without touching any database."""
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = _manifest(archive)
            return tuple(_case_draft(archive, folder) for folder in manifest["cases"])
    except zipfile.BadZipFile as error:
        raise ArchiveError(f"{path} is not a zip archive: {error}") from error
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, CaseStoreError):
            raise ArchiveError(f"{path}: {error}") from error
        raise ArchiveError(f"{path}: malformed manifest ({type(error).__name__}: {error})") from error


def import_archive(store: Any, session: InstructorSession, path: Path) -> tuple[str, ...]:
    """Validate `path` and add all its cases in one transaction; returns the imported slugs.

    DuplicateCase when any slug exists already (nothing is written).
    """
    drafts = read_archive(path)
    try:
        records = store.create_cases(session, drafts)
    except DuplicateCase as error:
        raise DuplicateCase(f"{path} was not imported: {error}") from error
    except InvalidCaseData as error:
        raise ArchiveError(f"{path} was not imported: {error}") from error
    return tuple(r.summary.slug for r in records)


def _manifest(archive: zipfile.ZipFile) -> dict[str, Any]:
    infos = archive.infolist()
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise ArchiveError(f"archive has {len(infos)} files; the limit is {MAX_ARCHIVE_MEMBERS}")
    manifest = json.loads(_read(archive, MANIFEST))
    version = manifest.get("schema_version")
    if manifest.get("format") != FORMAT_NAME or version != SCHEMA_VERSION:
        raise ArchiveError(
            f"archive format {manifest.get('format')!r} version {version!r} is not supported; this "
            f"program reads {FORMAT_NAME!r} version {SCHEMA_VERSION} (re-export it with a matching version)"
        )
    if not isinstance(manifest.get("cases"), list):
        raise ArchiveError("manifest has no 'cases' list")
    return manifest


def _read(archive: zipfile.ZipFile, name: str) -> bytes:
    try:
        info = archive.getinfo(name)
    except KeyError as error:
        raise ArchiveError(f"the archive lacks {name!r}, which the manifest names") from error
    if info.file_size > MAX_MEMBER_BYTES:
        raise ArchiveError(f"{name} is {info.file_size} bytes; the limit is {MAX_MEMBER_BYTES}")
    return archive.read(info)


def _case_draft(archive: zipfile.ZipFile, folder: str) -> CaseDraft:
    """One case folder of the bundle, read by the same reader as a library folder (cases.casefolder)."""
    safe_relative(folder)
    entry = json.loads(_read(archive, f"{folder}/{CASE_FILE}"))
    return draft_from_entry(entry, lambda name: _read(archive, f"{folder}/{safe_relative(name)}"))
