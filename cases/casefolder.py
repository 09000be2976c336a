"""Cases as data: one folder per case, a `case.json` plus its images and masks. One schema, one reader.

    <library>/<slug>/case.json     {"format": "medplib-case", "schema_version": 1, "slug": ..., "title": ...,
                                    "images": [{"file": ..., "masks": [{"label": ..., "file": ...}]}],
                                    "questions": [{"kind": ..., "prompt": ..., "answer_key": {...}}], ...}
    <library>/<slug>/image-0.png   files named relative to the case folder, or "asset:<path>" for a file
                                    of the shipped image set (assets/medimages), so starter cases need no copy

Masks are PNG (0 outside, non-zero inside) or NIfTI (`"nifti": "mask.nii.gz"`, a 2-D or 1-slice volume in
the image's row/column order). The starter library (cases/library) and export bundles (cases.archive) use
this same format, so an unzipped bundle is a library folder and `python -m cases validate DIR` checks both.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cases.errors import InvalidCaseData
from cases.imaging import decode_mask, decode_rgb
from cases.marking import AnswerKey
from cases.records import CaseDraft, CaseRecord, ImageDraft, MaskDraft, ModelOutputDraft, QuestionDraft

CASE_FILE = "case.json"
CASE_FORMAT = "medplib-case"
CASE_SCHEMA_VERSION = 1
ASSET_PREFIX = "asset:"
LIBRARY_DIR = Path(__file__).resolve().parent / "library"
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "medimages"
MAX_CASE_FILE_BYTES = 2 * 1024 * 1024
TEXT_FIELDS = (
    "slug", "title", "modality", "anatomy", "plane", "difficulty", "vignette", "findings", "discussion",
    "window_preset", "source", "provenance", "licence",
)  # fmt: skip
Reader = Callable[[str], bytes]
Writer = Callable[[str, bytes], None]


# ------------------------------------------------------------------------------------------------ reading


def read_library(root: Path = LIBRARY_DIR, assets_dir: Path = ASSETS_DIR) -> tuple[CaseDraft, ...]:
    """Every case folder under `root` (sorted by folder name) as drafts; InvalidCaseData names the folder."""
    folders = case_folders(root)
    if not folders:
        raise InvalidCaseData(f"{root} has no case folder (a folder with a {CASE_FILE})")
    return tuple(read_case_folder(folder, assets_dir) for folder in folders)


def case_folders(root: Path) -> tuple[Path, ...]:
    """The folders under `root` (itself included) that hold a case file, sorted."""
    root = Path(root)
    if (root / CASE_FILE).is_file():
        return (root,)
    return tuple(sorted(p.parent for p in root.glob(f"*/{CASE_FILE}")))


def read_case_folder(folder: Path, assets_dir: Path = ASSETS_DIR) -> CaseDraft:
    """One case folder → a draft (not yet validated against the store's rules: see `validate`)."""
    folder = Path(folder)
    path = folder / CASE_FILE
    if not path.is_file():
        raise InvalidCaseData(f"{folder} has no {CASE_FILE}")
    if path.stat().st_size > MAX_CASE_FILE_BYTES:
        raise InvalidCaseData(f"{path} is over {MAX_CASE_FILE_BYTES} bytes")
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        return draft_from_entry(entry, folder_reader(folder, assets_dir))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise InvalidCaseData(f"{path}: {_describe(error)}") from error


def folder_reader(folder: Path, assets_dir: Path) -> Reader:
    """Read a file named in a case file: relative to `folder`, or `asset:` relative to `assets_dir`."""

    def read(name: str) -> bytes:
        base, relative = (assets_dir, name[len(ASSET_PREFIX) :]) if name.startswith(ASSET_PREFIX) else (folder, name)
        path = base / safe_relative(relative)
        if not path.is_file():
            raise InvalidCaseData(f"{name!r} is missing (looked for {path.name} in {base})")
        return path.read_bytes()

    return read


def safe_relative(name: str) -> PurePosixPath:
    """A relative POSIX path without '..' or a root; InvalidCaseData otherwise (no escaping the folder)."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise InvalidCaseData(f"file name {name!r} must be a relative path inside the case folder")
    return path


def draft_from_entry(entry: Mapping[str, Any], read: Reader) -> CaseDraft:
    """A parsed case file → CaseDraft; `read(name)` returns the bytes of a file it names."""
    if entry.get("format") != CASE_FORMAT or entry.get("schema_version") != CASE_SCHEMA_VERSION:
        raise InvalidCaseData(
            f"case format {entry.get('format')!r} version {entry.get('schema_version')!r} is not supported; "
            f"this program reads {CASE_FORMAT!r} version {CASE_SCHEMA_VERSION}"
        )
    return CaseDraft(
        **{name: entry.get(name) for name in TEXT_FIELDS},
        key_points=tuple(entry["key_points"]),
        tags=tuple(entry["tags"]),
        synthetic=bool(entry.get("synthetic", False)),
        published=bool(entry.get("published", False)),
        burned_in_suspected=bool(entry.get("burned_in_review_required", False)),
        burned_in_reviewed=bool(entry.get("burned_in_reviewed", False)),
        images=tuple(_image_draft(image, read) for image in entry["images"]),
        questions=tuple(_question_draft(q, read) for q in entry["questions"]),
    )


def _image_draft(entry: Mapping[str, Any], read: Reader) -> ImageDraft:
    spacing = entry.get("spacing_mm")
    return ImageDraft(
        pixels=decode_rgb(read(entry["file"])),
        masks=tuple(MaskDraft(m["label"], _read_mask(m, read)) for m in entry.get("masks", ())),
        spacing_mm=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        description=entry.get("description", ""),
    )


def _read_mask(entry: Mapping[str, Any], read: Reader) -> np.ndarray:
    if entry.get("file"):
        return decode_mask(read(entry["file"]))
    if entry.get("nifti"):
        return nifti_mask_from_bytes(read(entry["nifti"]))
    raise InvalidCaseData(f"mask {entry.get('label')!r} names neither a 'file' (PNG) nor a 'nifti' file")


def _question_draft(entry: Mapping[str, Any], read: Reader) -> QuestionDraft:
    region = entry.get("region_file")
    key = entry.get("answer_key")
    return QuestionDraft(
        kind=entry["kind"],
        prompt=entry["prompt"],
        reference_answer=entry["reference_answer"],
        synonyms=tuple(entry.get("synonyms", ())),
        choices=tuple(entry.get("choices", ())),
        target_label=entry.get("target_label"),
        region=None if region is None else decode_mask(read(region)),
        answer_key=None if key is None else AnswerKey.from_json(key),
        model_outputs=tuple(_output_draft(o, read) for o in entry.get("model_outputs", ())),
    )


def _output_draft(entry: Mapping[str, Any], read: Reader) -> ModelOutputDraft:
    return ModelOutputDraft(
        model_id=entry["model_id"],
        revision=entry.get("revision"),
        parameters=dict(entry.get("parameters", {})),
        answer=entry["answer"],
        mask=None if entry.get("mask_file") is None else decode_mask(read(entry["mask_file"])),
        created_at=dt.datetime.fromisoformat(entry["created_at"]),
    )


def _describe(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"missing field {error}"
    return f"{type(error).__name__}: {error}" if not isinstance(error, InvalidCaseData) else str(error)


# ------------------------------------------------------------------------------------------------ checking


def validate_folder(root: Path, assets_dir: Path = ASSETS_DIR) -> tuple[tuple[str, str], ...]:
    """Check every case folder under `root` as the store would; returns (folder name, problem) pairs.

    Problems: unreadable or malformed files, a slug that differs from the folder name, anything the
    store refuses (sizes, kinds, labels), an open question without an answer key, duplicate slugs.
    """
    from cases.convert import case_row  # validation without a database

    problems: list[tuple[str, str]] = []
    folders = case_folders(root)
    if not folders:
        return ((str(root), f"no case folder (a folder with a {CASE_FILE})"),)
    seen: dict[str, str] = {}
    for folder in folders:
        try:
            draft = read_case_folder(folder, assets_dir)
            case_row(draft)
        except InvalidCaseData as error:
            problems.append((folder.name, str(error)))
            continue
        problems.extend((folder.name, p) for p in _draft_problems(folder, draft, seen))
    return tuple(problems)


def _draft_problems(folder: Path, draft: CaseDraft, seen: dict[str, str]) -> list[str]:
    problems = []
    if draft.slug != folder.name:
        problems.append(f"slug {draft.slug!r} differs from the folder name (rename one of them)")
    if draft.slug in seen:
        problems.append(f"slug {draft.slug!r} is also used by {seen[draft.slug]}")
    seen[str(draft.slug)] = folder.name
    for position, question in enumerate(draft.questions):
        if question.kind == "open" and question.answer_key is None:
            problems.append(f"open question {position} has no answer_key (accepted answers and concepts)")
    return problems


# ------------------------------------------------------------------------------------------------ writing


def entry_from_record(
    record: CaseRecord, outputs: Mapping[int, Any], write: Writer, *, nifti_masks: bool = False
) -> dict[str, Any]:
    """A stored case → its case-file dict, writing its images and masks through `write(name, bytes)`.

    outputs: question id → cached model outputs (newest first, as the store returns them).
    nifti_masks: also write every reference mask as NIfTI (`"nifti"` beside `"file"`).
    """
    s = record.summary
    entry: dict[str, Any] = {"format": CASE_FORMAT, "schema_version": CASE_SCHEMA_VERSION}
    entry.update(
        slug=s.slug, title=s.title, modality=s.modality, anatomy=s.anatomy, plane=s.plane,
        difficulty=s.difficulty, published=s.published, synthetic=record.synthetic,
        window_preset=record.window_preset, vignette=record.vignette, findings=record.findings,
        discussion=record.discussion, key_points=list(record.key_points), tags=list(s.tags),
        source=record.source, provenance=record.provenance, licence=record.licence,
        burned_in_review_required=s.burned_in_review.required,
        burned_in_reviewed=s.burned_in_review.reviewed_by is not None,
    )  # fmt: skip
    entry["images"] = [_image_entry(i, image, write, nifti_masks) for i, image in enumerate(record.images)]
    entry["questions"] = [
        _question_entry(k, q, outputs.get(q.id, ()), write) for k, q in enumerate(record.questions)
    ]
    return entry


def _image_entry(i: int, image: Any, write: Writer, nifti_masks: bool) -> dict[str, Any]:
    write(f"image-{i}.png", image.png)
    masks = []
    for j, mask in enumerate(image.masks):
        name = f"image-{i}--mask-{j}"
        write(f"{name}.png", mask.png)
        item = {"label": mask.label, "file": f"{name}.png"}
        if nifti_masks:
            write(f"{name}.nii.gz", nifti_mask_bytes(mask.array(), image.spacing_mm))
            item["nifti"] = f"{name}.nii.gz"
        masks.append(item)
    spacing = None if image.spacing_mm is None else list(image.spacing_mm)
    return {"file": f"image-{i}.png", "description": image.description, "spacing_mm": spacing, "masks": masks}


def _question_entry(k: int, question: Any, outputs: Any, write: Writer) -> dict[str, Any]:
    region = None
    if question.region_png is not None:
        region = f"question-{k}--region.png"
        write(region, question.region_png)
    saved = []
    for m, output in enumerate(reversed(outputs)):  # oldest first, so re-import keeps the order
        mask = None
        if output.mask_png is not None:
            mask = f"question-{k}--output-{m}.png"
            write(mask, output.mask_png)
        saved.append(
            {"model_id": output.model_id, "revision": output.revision, "parameters": dict(output.parameters),
             "answer": output.answer, "mask_file": mask, "created_at": output.created_at.isoformat()}
        )  # fmt: skip
    entry = {
        "kind": question.kind, "prompt": question.prompt, "reference_answer": question.reference_answer,
        "synonyms": list(question.synonyms), "choices": list(question.choices),
        "target_label": question.target_label, "region_file": region, "model_outputs": saved,
    }  # fmt: skip
    if question.answer_key is not None:
        entry["answer_key"] = question.answer_key.to_json()
    return entry


def dump_entry(entry: Mapping[str, Any]) -> bytes:
    """The case file's bytes (UTF-8 JSON, one field per line, readable and diff-friendly)."""
    return (json.dumps(entry, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def write_case_folder(folder: Path, record: CaseRecord, outputs: Mapping[int, Any] | None = None) -> Path:
    """Write a stored case as a new case folder (refuses to overwrite); returns the case file path."""
    folder = Path(folder)
    if folder.exists():
        raise InvalidCaseData(f"{folder} already exists; choose a new folder")
    folder.mkdir(parents=True)

    def write(name: str, data: bytes) -> None:
        (folder / safe_relative(name)).write_bytes(data)

    entry = entry_from_record(record, outputs or {}, write)
    (folder / CASE_FILE).write_bytes(dump_entry(entry))
    return folder / CASE_FILE


# ------------------------------------------------------------------------------------------------ NIfTI


def nifti_mask_bytes(mask: np.ndarray, spacing_mm: tuple[float, float] | None) -> bytes:
    """(H, W) bool → gzipped NIfTI-1 (uint8, shape (H, W, 1), voxel size = spacing or 1 mm)."""
    import nibabel as nib

    row, col = spacing_mm or (1.0, 1.0)
    affine = np.diag([row, col, 1.0, 1.0])
    image = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8)[:, :, None], affine)
    return gzip.compress(image.to_bytes(), mtime=0)


def nifti_mask_from_bytes(data: bytes) -> np.ndarray:
    """NIfTI bytes (gzipped or not) of an (H, W) or (H, W, 1) mask → (H, W) bool."""
    import nibabel as nib

    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    image = nib.Nifti1Image.from_bytes(raw)
    array = np.asanyarray(image.dataobj)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise InvalidCaseData(f"a NIfTI mask must be 2-D (or one slice), got shape {array.shape}")
    return array != 0
