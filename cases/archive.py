"""Export and import of case archives: a zip of case folders (the cases.casefolder format) + a manifest.

Layout (schema version 2):
    manifest.json                 {"schema_version": 2, "format": "medplib-cases", "cases": ["cases/<slug>", ...]}
    cases/<slug>/case.json        the case file, exactly as in a library folder (one schema, one reader)
    cases/<slug>/image-<i>.png    (H, W, 3) RGB; image-<i>--mask-<j>.png (+ .nii.gz with nifti_masks),
                                  question-<k>--region.png, question-<k>--output-<m>.png

Import validates everything (schema version, files present, sizes, duplicate slugs) before one
all-or-nothing transaction, so a rejected archive writes nothing. Reading is held to an `ArchiveBudget`:
inflated bytes are counted while reading (a lying zip header changes nothing), manifest nesting depth
is limited, and the decoded size of every referenced image is added up from its header before any
pixel is decoded, so reference-amplified bundles are refused early. Quiz attempts are never exported.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cases.casefolder import CASE_FILE, draft_from_entry, dump_entry, entry_from_record, safe_relative
from cases.errors import UNTRUSTED_INPUT_ERRORS, ArchiveError, CaseStoreError, DuplicateCase, InvalidCaseData
from cases.imaging import open_checked
from cases.records import CaseDraft, InstructorSession

SCHEMA_VERSION = 2  # 2: one case.json per folder (cases.casefolder)
FORMAT_NAME = "medplib-cases"
MANIFEST = "manifest.json"
MAX_MEMBER_BYTES = 32 * 1024 * 1024  # per zip member, counted while inflating (never the header's size)
MAX_ARCHIVE_MEMBERS = 20_000
READ_CHUNK = 1 << 20
NIFTI_HEADER_BYTES = 348
HEADER_BYTES = 64 * 1024  # image headers (PNG IHDR, JPEG SOF) must lie in a member's first 64 KiB


@dataclass(frozen=True)
class ArchiveBudget:
    """What one import may cost. Bytes are counted as really inflated; pixels from headers, pre-decode."""

    max_member_bytes: int = MAX_MEMBER_BYTES
    max_total_bytes: int = 512 * 2**20  # all members together, inflated
    max_decoded_bytes: int = 512 * 2**20  # decoded pixel arrays of every reference (RGB 3 B, mask 2 B/px)
    max_references_per_member: int = 2
    max_manifest_bytes: int = 8 * 2**20
    max_manifest_depth: int = 16
    max_cases: int = 2_000


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
    store.log_action(session, "export_archive", f"{len(records)} cases to {out.name}")
    return len(records)


def read_archive(path: Path, budget: ArchiveBudget | None = None) -> tuple[CaseDraft, ...]:
    """Parse and validate an archive into drafts without touching any database.

    Two passes: the manifest (size, nesting depth, types) and every image header are checked against
    `budget` before any pixel is decoded; then members are read counting the bytes really inflated.
    Every failure is an ArchiveError (nothing else escapes, whatever the bytes).
    """
    path = Path(path)
    budget = budget or ArchiveBudget()
    if not path.is_file():
        raise ArchiveError(f"{path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            reader = _BudgetReader(archive, budget)
            manifest = _manifest(reader)
            entries = [(folder, _case_entry(reader, folder)) for folder in manifest["cases"]]
            reader.plan(entries)  # headers only: refuse before decoding past the budget
            return tuple(_case_draft(reader, folder, entry) for folder, entry in entries)
    except zipfile.BadZipFile as error:
        raise ArchiveError(f"{path} is not a readable zip archive: {error}") from None
    except ArchiveError as error:
        raise ArchiveError(f"{path}: {error}") from None
    except CaseStoreError as error:
        raise ArchiveError(f"{path}: {error}") from error
    except UNTRUSTED_INPUT_ERRORS as error:
        raise ArchiveError(f"{path}: malformed archive ({type(error).__name__}: {error})") from None


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
    store.log_action(session, "import_archive", f"{len(records)} cases from {Path(path).name}")
    return tuple(r.summary.slug for r in records)


def _manifest(reader: _BudgetReader) -> dict[str, Any]:
    infos = reader.archive.infolist()
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise ArchiveError(f"archive has {len(infos)} files; the limit is {MAX_ARCHIVE_MEMBERS}")
    raw = reader.read(MANIFEST, limit=reader.budget.max_manifest_bytes)
    check_json_depth(raw, reader.budget.max_manifest_depth)
    manifest = json.loads(raw)
    if not isinstance(manifest, dict):
        raise ArchiveError("manifest.json is not a JSON object")
    version = manifest.get("schema_version")
    if manifest.get("format") != FORMAT_NAME or version != SCHEMA_VERSION:
        raise ArchiveError(
            f"archive format {manifest.get('format')!r} version {version!r} is not supported; this "
            f"program reads {FORMAT_NAME!r} version {SCHEMA_VERSION} (re-export it with a matching version)"
        )
    cases = manifest.get("cases")
    if not isinstance(cases, list) or not all(isinstance(c, str) for c in cases):
        raise ArchiveError("manifest has no 'cases' list of case folder names")
    if len(cases) > reader.budget.max_cases:
        raise ArchiveError(f"archive holds {len(cases)} cases; the limit is {reader.budget.max_cases}")
    return manifest


def check_json_depth(raw: bytes, max_depth: int) -> None:
    """Refuse JSON nested deeper than `max_depth` (arrays/objects), scanning bytes without recursion."""
    depth, in_string, escaped = 0, False, False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > max_depth:
                raise ArchiveError(f"manifest.json is nested deeper than {max_depth} levels")
        elif byte in (0x5D, 0x7D):
            depth -= 1


def member_references(entries: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, str]]:
    """(member name, 'image' | 'mask' | 'nifti') for every file the case files name and the reader will
    read (a mask's PNG when it has one, else its NIfTI), once per reference."""
    refs: list[tuple[str, str]] = []
    for folder, entry in entries:
        names: list[tuple[str, str]] = []
        for image in entry["images"]:
            names.append((image["file"], "image"))
            names.extend((m["file"], "mask") if m.get("file") else (m["nifti"], "nifti") for m in image.get("masks", ()))
        for question in entry["questions"]:
            if question.get("region_file") is not None:
                names.append((question["region_file"], "mask"))
            names.extend((o["mask_file"], "mask") for o in question.get("model_outputs", ()) if o.get("mask_file"))
        refs.extend((f"{folder}/{safe_relative(name)}", kind) for name, kind in names)
    return refs


class _BudgetReader:
    """Reads members counting the bytes actually inflated, and plans the pixel budget from headers."""

    def __init__(self, archive: zipfile.ZipFile, budget: ArchiveBudget) -> None:
        self.archive = archive
        self.budget = budget
        self.inflated = 0

    def read(self, name: str, limit: int | None = None) -> bytes:
        """A member's bytes; ArchiveError as soon as it (or the bundle) inflates past its limit."""
        if not isinstance(name, str):
            raise ArchiveError(f"member names must be strings, got {type(name).__name__}")
        limit = min(limit or self.budget.max_member_bytes, self.budget.max_member_bytes)
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise ArchiveError(f"the archive lacks {name!r}, which the manifest names") from None
        chunks, size = [], 0
        with self.archive.open(info) as stream:  # zipfile checks the CRC at the end
            while chunk := stream.read(READ_CHUNK):
                size += len(chunk)
                self.inflated += len(chunk)
                if size > limit:
                    raise ArchiveError(
                        f"{name} inflates past {limit} bytes (its header says {info.file_size})"
                    )
                if self.inflated > self.budget.max_total_bytes:
                    raise ArchiveError(
                        f"the archive inflates past {self.budget.max_total_bytes} bytes in all"
                    )
                chunks.append(chunk)
        return b"".join(chunks)

    def plan(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        """Check reference counts and the decoded-pixel total from image headers only."""
        refs = member_references(entries)
        counts = Counter(name for name, _kind in refs)
        name, most = counts.most_common(1)[0] if counts else ("", 0)
        if most > self.budget.max_references_per_member:
            raise ArchiveError(
                f"{name} is referenced {most} times; the limit is {self.budget.max_references_per_member}"
            )
        total = 0
        for name, kind in refs:
            width, height = self._header_size(name, kind)
            total += width * height * (3 if kind == "image" else 2)
            if total > self.budget.max_decoded_bytes:
                raise ArchiveError(
                    f"decoding the archive's images needs over {self.budget.max_decoded_bytes // 2**20} MiB; "
                    "split it into smaller archives"
                )

    def _header_size(self, name: str, kind: str) -> tuple[int, int]:
        head = self._read_head(name)
        if kind == "nifti":
            return nifti_header_size(head)
        image = open_checked(head, formats=("PNG", "JPEG"))
        return image.width, image.height

    def _read_head(self, name: str) -> bytes:
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise ArchiveError(f"the archive lacks {name!r}, which the manifest names") from None
        with self.archive.open(info) as stream:
            return stream.read(HEADER_BYTES)


def nifti_header_size(head: bytes) -> tuple[int, int]:
    """(dim[1], dim[2]) of a (gzipped) NIfTI-1 header, from its first bytes only; ArchiveError otherwise."""
    if head[:2] == b"\x1f\x8b":
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, NIFTI_HEADER_BYTES)
    if len(head) < NIFTI_HEADER_BYTES:
        raise ArchiveError("a NIfTI mask has no complete header")
    for order in ("<", ">"):
        if struct.unpack(f"{order}i", head[:4])[0] == NIFTI_HEADER_BYTES:
            dims = struct.unpack(f"{order}8h", head[40:56])
            return max(dims[1], 1), max(dims[2], 1) * max(dims[3], 1)
    raise ArchiveError("a NIfTI mask has no NIfTI-1 header")


def _case_entry(reader: _BudgetReader, folder: str) -> dict[str, Any]:
    """A bundle folder's case file, parsed within the manifest's size and nesting limits."""
    raw = reader.read(f"{safe_relative(folder)}/{CASE_FILE}", limit=reader.budget.max_manifest_bytes)
    check_json_depth(raw, reader.budget.max_manifest_depth)
    entry = json.loads(raw)
    if not isinstance(entry, dict):
        raise ArchiveError(f"{folder}/{CASE_FILE} is not a JSON object")
    return entry


def _case_draft(reader: _BudgetReader, folder: str, entry: dict[str, Any]) -> CaseDraft:
    """One case folder of the bundle, read by the same reader as a library folder (cases.casefolder)."""
    return draft_from_entry(entry, lambda name: reader.read(f"{folder}/{safe_relative(name)}"))
