"""Export and import of case archives: a zip with `manifest.json` and PNG images/masks.

Layout (schema version 1):
    manifest.json                 {"schema_version": 1, "format": "medplib-cases", "cases": [...]}
    cases/<slug>/image-<i>.png    (H, W, 3) RGB
    cases/<slug>/image-<i>--mask-<j>.png, question-<k>--region.png, question-<k>--output-<m>.png

Import validates everything (schema version, files present, sizes, duplicate slugs) before one
all-or-nothing transaction, so a rejected archive writes nothing. Quiz attempts are never exported.
"""

from __future__ import annotations

import datetime as dt
import json
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cases.errors import ArchiveError, CaseStoreError, DuplicateCase, InvalidCaseData
from cases.imaging import decode_mask, decode_rgb
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
MAX_MEMBER_BYTES = 32 * 1024 * 1024  # per zip member, checked before reading (zip bombs)
MAX_ARCHIVE_MEMBERS = 20_000
CASE_TEXT_FIELDS = (
    "title", "modality", "anatomy", "plane", "difficulty", "vignette", "findings", "discussion",
    "window_preset", "source", "provenance", "licence", "synthetic",
)  # fmt: skip


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
    return len(records)


def _write_case(archive: zipfile.ZipFile, record: CaseRecord, outputs: Mapping[int, Any]) -> dict[str, Any]:
    folder = f"cases/{record.summary.slug}"
    entry: dict[str, Any] = {name: getattr(record, name, None) for name in CASE_TEXT_FIELDS}
    entry.update(
        slug=record.summary.slug, title=record.title, modality=record.summary.modality,
        anatomy=record.summary.anatomy, plane=record.summary.plane, difficulty=record.summary.difficulty,
        key_points=list(record.key_points), tags=list(record.summary.tags), published=record.summary.published,
        images=[], questions=[],
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


def read_archive(path: Path) -> tuple[CaseDraft, ...]:
    """Parse and validate an archive into drafts without touching any database."""
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = _manifest(archive)
            return tuple(_case_draft(archive, entry) for entry in manifest["cases"])
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


def _case_draft(archive: zipfile.ZipFile, entry: Mapping[str, Any]) -> CaseDraft:
    images = tuple(
        ImageDraft(
            pixels=decode_rgb(_read(archive, image["file"])),
            masks=tuple(
                MaskDraft(m["label"], decode_mask(_read(archive, m["file"]))) for m in image["masks"]
            ),
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
        images=images,
        questions=tuple(_question_draft(archive, q) for q in entry["questions"]),
    )


def _question_draft(archive: zipfile.ZipFile, entry: Mapping[str, Any]) -> QuestionDraft:
    region = entry.get("region_file")
    return QuestionDraft(
        kind=entry["kind"],
        prompt=entry["prompt"],
        reference_answer=entry["reference_answer"],
        synonyms=tuple(entry["synonyms"]),
        choices=tuple(entry["choices"]),
        target_label=entry["target_label"],
        region=None if region is None else decode_mask(_read(archive, region)),
        model_outputs=tuple(
            ModelOutputDraft(
                model_id=o["model_id"],
                revision=o["revision"],
                parameters=dict(o["parameters"]),
                answer=o["answer"],
                mask=None if o["mask_file"] is None else decode_mask(_read(archive, o["mask_file"])),
                created_at=dt.datetime.fromisoformat(o["created_at"]),
            )
            for o in entry.get("model_outputs", ())
        ),
    )
