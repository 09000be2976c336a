"""Export and import of case archives: a zip with `manifest.json` and PNG images/masks.

Layout (schema version 1):
    manifest.json                 {"schema_version": 1, "format": "medplib-cases", "cases": [...]}
    cases/<slug>/image-<i>.png    (H, W, 3) RGB
    cases/<slug>/image-<i>--mask-<j>.png, question-<k>--region.png, question-<k>--output-<m>.png

Import validates everything (schema version, files present, sizes, duplicate slugs) before one
all-or-nothing transaction, so a rejected archive writes nothing. Reading is held to an `ArchiveBudget`:
inflated bytes are counted while reading (a lying zip header changes nothing), manifest nesting depth
is limited, and the decoded size of every referenced image is added up from its header before any
pixel is decoded, so reference-amplified bundles are refused early. Quiz attempts are never exported.
"""

from __future__ import annotations

import datetime as dt
import json
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cases.errors import UNTRUSTED_INPUT_ERRORS, ArchiveError, CaseStoreError, DuplicateCase, InvalidCaseData
from cases.imaging import decode_mask, decode_rgb, open_checked
from cases.records import (
    CaseDraft,
    CaseRecord,
    ImageDraft,
    InstructorSession,
    MaskDraft,
    ModelOutputDraft,
    QuestionDraft,
)

SCHEMA_VERSION = 1
FORMAT_NAME = "medplib-cases"
MANIFEST = "manifest.json"
MAX_MEMBER_BYTES = 32 * 1024 * 1024  # per zip member, counted while inflating (never the header's size)
MAX_ARCHIVE_MEMBERS = 20_000
READ_CHUNK = 1 << 20
HEADER_BYTES = 64 * 1024  # image headers (PNG IHDR, JPEG SOF) must lie in a member's first 64 KiB
CASE_TEXT_FIELDS = (
    "title", "modality", "anatomy", "plane", "difficulty", "vignette", "findings", "discussion",
    "window_preset", "source", "provenance", "licence", "synthetic",
)  # fmt: skip


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


def export_archive(store: Any, session: InstructorSession, out: Path, cases: Iterable[int | str] = ()) -> int:
    """Write the chosen cases (default: all, unpublished included) to `out`; returns the case count."""
    ids = list(cases) or [c.id for c in store.list_cases(include_unpublished=True)]
    records = [store.get_case(case_id, session) for case_id in ids]
    out = Path(out)
    if out.exists():
        raise ArchiveError(f"{out} already exists; choose a new file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"schema_version": SCHEMA_VERSION, "format": FORMAT_NAME, "cases": []}
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for record in records:
            outputs = {q.id: store.model_outputs(q.id) for q in record.questions}
            manifest["cases"].append(_write_case(archive, record, outputs))
        archive.writestr(MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))
    store.log_action(session, "export_archive", f"{len(records)} cases to {out.name}")
    return len(records)


def _write_case(archive: zipfile.ZipFile, record: CaseRecord, outputs: Mapping[int, Any]) -> dict[str, Any]:
    folder = f"cases/{record.summary.slug}"
    entry: dict[str, Any] = {name: getattr(record, name, None) for name in CASE_TEXT_FIELDS}
    entry.update(
        slug=record.summary.slug, title=record.title, modality=record.summary.modality,
        anatomy=record.summary.anatomy, plane=record.summary.plane, difficulty=record.summary.difficulty,
        key_points=list(record.key_points), tags=list(record.summary.tags), published=record.summary.published,
        burned_in_review_required=record.summary.burned_in_review.required,
        burned_in_reviewed=record.summary.burned_in_review.reviewed_by is not None, images=[], questions=[],
    )  # fmt: skip
    for i, image in enumerate(record.images):
        archive.writestr(f"{folder}/image-{i}.png", image.png)
        masks = []
        for j, mask in enumerate(image.masks):
            archive.writestr(f"{folder}/image-{i}--mask-{j}.png", mask.png)
            masks.append({"label": mask.label, "file": f"{folder}/image-{i}--mask-{j}.png"})
        entry["images"].append(
            {"file": f"{folder}/image-{i}.png", "description": image.description,
             "spacing_mm": None if image.spacing_mm is None else list(image.spacing_mm), "masks": masks}
        )  # fmt: skip
    for k, question in enumerate(record.questions):
        entry["questions"].append(_question_entry(archive, folder, k, question, outputs.get(question.id, ())))
    return entry


def _question_entry(
    archive: zipfile.ZipFile, folder: str, k: int, question: Any, outputs: Any
) -> dict[str, Any]:
    region = None
    if question.region_png is not None:
        region = f"{folder}/question-{k}--region.png"
        archive.writestr(region, question.region_png)
    saved = []
    for m, output in enumerate(reversed(outputs)):  # oldest first, so re-import keeps the order
        mask = None
        if output.mask_png is not None:
            mask = f"{folder}/question-{k}--output-{m}.png"
            archive.writestr(mask, output.mask_png)
        saved.append(
            {"model_id": output.model_id, "revision": output.revision, "parameters": dict(output.parameters),
             "answer": output.answer, "mask_file": mask, "created_at": output.created_at.isoformat()}
        )  # fmt: skip
    return {
        "kind": question.kind, "prompt": question.prompt, "reference_answer": question.reference_answer,
        "synonyms": list(question.synonyms), "choices": list(question.choices),
        "target_label": question.target_label, "region_file": region, "model_outputs": saved,
    }  # fmt: skip


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
            reader.plan(manifest["cases"])  # headers only: refuse before decoding past the budget
            return tuple(_case_draft(reader, entry) for entry in manifest["cases"])
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
    if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
        raise ArchiveError("manifest has no 'cases' list of objects")
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


def member_references(cases: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(member name, 'image' | 'mask') for every file the manifest names, once per reference."""
    refs: list[tuple[str, str]] = []
    for entry in cases:
        for image in entry["images"]:
            refs.append((image["file"], "image"))
            refs.extend((mask["file"], "mask") for mask in image["masks"])
        for question in entry["questions"]:
            if question.get("region_file") is not None:
                refs.append((question["region_file"], "mask"))
            refs.extend((o["mask_file"], "mask") for o in question.get("model_outputs", ()) if o["mask_file"])
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

    def plan(self, cases: list[dict[str, Any]]) -> None:
        """Check reference counts and the decoded-pixel total from image headers only."""
        refs = member_references(cases)
        counts = Counter(name for name, _kind in refs)
        name, most = counts.most_common(1)[0] if counts else ("", 0)
        if most > self.budget.max_references_per_member:
            raise ArchiveError(
                f"{name} is referenced {most} times; the limit is {self.budget.max_references_per_member}"
            )
        total = 0
        for name, kind in refs:
            width, height = self._header_size(name)
            total += width * height * (3 if kind == "image" else 2)
            if total > self.budget.max_decoded_bytes:
                raise ArchiveError(
                    f"decoding the archive's images needs over {self.budget.max_decoded_bytes // 2**20} MiB; "
                    "split it into smaller archives"
                )

    def _header_size(self, name: str) -> tuple[int, int]:
        head = self._read_head(name)
        image = open_checked(head, formats=("PNG", "JPEG"))
        return image.width, image.height

    def _read_head(self, name: str) -> bytes:
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise ArchiveError(f"the archive lacks {name!r}, which the manifest names") from None
        with self.archive.open(info) as stream:
            return stream.read(HEADER_BYTES)


def _case_draft(archive: _BudgetReader, entry: Mapping[str, Any]) -> CaseDraft:
    images = tuple(
        ImageDraft(
            pixels=decode_rgb(archive.read(image["file"])),
            masks=tuple(MaskDraft(m["label"], decode_mask(archive.read(m["file"]))) for m in image["masks"]),
            spacing_mm=None if image["spacing_mm"] is None else tuple(image["spacing_mm"]),
            description=image.get("description", ""),
        )
        for image in entry["images"]
    )
    return CaseDraft(
        **{name: entry[name] for name in CASE_TEXT_FIELDS},
        key_points=tuple(entry["key_points"]),
        tags=tuple(entry["tags"]),
        published=bool(entry["published"]),
        slug=entry["slug"],
        burned_in_suspected=bool(entry.get("burned_in_review_required", False)),
        burned_in_reviewed=bool(entry.get("burned_in_reviewed", False)),
        images=images,
        questions=tuple(_question_draft(archive, q) for q in entry["questions"]),
    )


def _question_draft(archive: _BudgetReader, entry: Mapping[str, Any]) -> QuestionDraft:
    region = entry.get("region_file")
    return QuestionDraft(
        kind=entry["kind"],
        prompt=entry["prompt"],
        reference_answer=entry["reference_answer"],
        synonyms=tuple(entry["synonyms"]),
        choices=tuple(entry["choices"]),
        target_label=entry["target_label"],
        region=None if region is None else decode_mask(archive.read(region)),
        model_outputs=tuple(
            ModelOutputDraft(
                model_id=o["model_id"],
                revision=o["revision"],
                parameters=dict(o["parameters"]),
                answer=o["answer"],
                mask=None if o["mask_file"] is None else decode_mask(archive.read(o["mask_file"])),
                created_at=dt.datetime.fromisoformat(o["created_at"]),
            )
            for o in entry.get("model_outputs", ())
        ),
    )
