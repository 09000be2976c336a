"""The starter library: curated cases built from assets/medimages (index.json + PNGs).

Each `Pick` names an index record, the structure the case is about (one of the record's mask labels),
a training level and a teaching topic (cases.starter_text). Every case gets the record's masks as
labelled reference masks and three questions: a closed one, a segmentation one ("Please segment the
…", phrased the way MedPLIB is prompted) and, where the topic has one, an open one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from cases.errors import InvalidCaseData
from cases.records import CaseDraft, ImageDraft, MaskDraft, QuestionDraft
from cases.starter_text import PLANE_QUESTION, TOPICS, Topic

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "medimages"
INDEX_NAME = "index.json"


@dataclass(frozen=True)
class Pick:
    """One curated starter case: index record id, focus mask label, training level, topic, title."""

    record: str
    label: str
    difficulty: str
    topic: str
    title: str


STUDENT, RESIDENT = "medical student", "resident"

STARTER_PICKS: tuple[Pick, ...] = (
    Pick("ct-pydicom-spine", "bone", STUDENT, "ct-bone", "Vertebral bone on axial CT"),
    Pick("ct-pydicom-spine", "body", STUDENT, "ct-body", "Body outline on axial CT"),
    Pick("mri-pydicom-liver-lesion", "liver lesion", RESIDENT, "mr-liver-lesion", "Focal liver lesion on MRI"),
    Pick("mri-mni152-axial-069", "brain", STUDENT, "mni-brain", "Normal brain, axial T1 MRI"),
    Pick("mri-mni152-coronal-111", "brain", STUDENT, "mni-brain", "Normal brain, coronal T1 MRI"),
    Pick("mri-mni152-sagittal-098", "brain", STUDENT, "mni-brain", "Normal brain, midsagittal T1 MRI"),
    Pick("mri-mni152-axial-081", "grey matter", STUDENT, "mni-grey-matter", "Grey matter, axial T1 MRI"),
    Pick("mri-mni152-coronal-123", "grey matter", RESIDENT, "mni-grey-matter", "Grey matter, coronal T1 MRI"),
    Pick("mri-mni152-sagittal-074", "grey matter", RESIDENT, "mni-grey-matter", "Grey matter, sagittal T1 MRI"),
    Pick("mri-mni152-axial-101", "white matter", STUDENT, "mni-white-matter", "White matter, axial T1 MRI"),
    Pick("mri-mni152-coronal-123", "white matter", STUDENT, "mni-white-matter", "White matter, coronal T1 MRI"),
    Pick("mri-mni152-sagittal-118", "white matter", RESIDENT, "mni-white-matter", "White matter, sagittal T1 MRI"),
    Pick("mri-mni152-axial-041-synthetic-lesion", "lesion", RESIDENT, "mni-synthetic-lesion",
         "Simulated temporal-lobe lesion, T1 MRI"),
    Pick("mri-mni152-axial-077-synthetic-lesion", "lesion", STUDENT, "mni-synthetic-lesion",
         "Simulated posterior white-matter lesion, T1 MRI"),
    Pick("mri-mni152-axial-089-synthetic-lesion", "lesion", STUDENT, "mni-synthetic-lesion",
         "Simulated frontal white-matter lesion, T1 MRI"),
    Pick("mri-mni152-axial-113-synthetic-lesion", "lesion", RESIDENT, "mni-synthetic-lesion",
         "Simulated centrum semiovale lesion, T1 MRI"),
    Pick("mri-mni152-axial-125-synthetic-lesion", "lesion", RESIDENT, "mni-synthetic-lesion",
         "Simulated high-convexity lesion, T1 MRI"),
    Pick("fluo-stardist-nuclei-tile00", "nuclei", STUDENT, "fluo-nuclei", "Nuclei in fluorescence microscopy (1)"),
    Pick("fluo-stardist-nuclei-tile05", "nuclei", STUDENT, "fluo-nuclei", "Nuclei in fluorescence microscopy (2)"),
    Pick("fluo-stardist-nuclei-tile10", "nuclei", RESIDENT, "fluo-nuclei", "Nuclei in fluorescence microscopy (3)"),
    Pick("fundus-skimage-retina-tile1", "retinal vessels", RESIDENT, "fundus-vessels", "Retinal vessels on a fundus photograph (one tile)"),
    Pick("fundus-skimage-retina-tile3", "optic disc", STUDENT, "fundus-disc", "Optic disc on a fundus photograph (one tile)"),
    Pick("he-stardist-histo-tile0", "nuclei", STUDENT, "he-nuclei", "Nuclei in an H&E section (1)"),
    Pick("he-stardist-histo-tile1", "nuclei", RESIDENT, "he-nuclei", "Nuclei in an H&E section (2)"),
    Pick("he-stardist-histo-tile2", "nuclei", RESIDENT, "he-nuclei", "Nuclei in an H&E section (3)"),
    Pick("ihc-skimage-colon-tile0", "DAB-positive staining", STUDENT, "ihc-dab", "DAB staining in colonic IHC (1)"),
    Pick("ihc-skimage-colon-tile2", "DAB-positive staining", RESIDENT, "ihc-dab", "DAB staining in colonic IHC (2)"),
    Pick("ihc-skimage-colon-tile1", "nuclei", RESIDENT, "ihc-nuclei", "Counterstained nuclei in colonic IHC"),
    Pick("nm-pydicom-bonescan-tile0", "high tracer uptake", RESIDENT, "nm-uptake",
         "Tracer uptake, planar whole-body scan (upper body)"),
    Pick("nm-pydicom-bonescan-tile1", "high tracer uptake", STUDENT, "nm-uptake",
         "Tracer uptake, planar whole-body scan (pelvis)"),
    Pick("nm-pydicom-bonescan-tile2", "body", STUDENT, "nm-body", "Body outline, planar whole-body scan (legs)"),
    Pick("phase-skimage-cell-tile0", "cell", STUDENT, "phase-cell", "A cell in quantitative phase microscopy (a quarter tile)"),
)  # fmt: skip


def load_index(assets_dir: Path = ASSETS_DIR) -> dict[str, Mapping[str, Any]]:
    """index.json records by id; FileNotFoundError says how to regenerate the folder."""
    path = assets_dir / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; regenerate it with `python -m training.sources --out assets/medimages`"
        )
    records = json.loads(path.read_text(encoding="utf-8"))
    return {record["id"]: record for record in records}


def starter_drafts(
    assets_dir: Path = ASSETS_DIR, picks: Sequence[Pick] = STARTER_PICKS
) -> tuple[CaseDraft, ...]:
    """The curated starter cases as drafts (published), read from `assets_dir`."""
    index = load_index(assets_dir)
    missing = sorted({p.record for p in picks} - index.keys())
    if missing:
        raise InvalidCaseData(f"starter cases name records missing from {assets_dir / INDEX_NAME}: {missing}")
    return tuple(_draft(pick, index[pick.record], assets_dir) for pick in picks)


def seed_starter_library(store: Any, assets_dir: Path = ASSETS_DIR) -> int:
    """Add the starter library to an empty store in one transaction; returns the number of cases."""
    try:
        drafts = starter_drafts(assets_dir)
    except FileNotFoundError as error:
        log.warning("starter library not seeded: %s", error)
        return 0
    store.create_cases(store.operator_session(), drafts)
    log.info("seeded the starter library: %d cases", len(drafts))
    return len(drafts)


def _draft(pick: Pick, record: Mapping[str, Any], assets_dir: Path) -> CaseDraft:
    topic = _topic_for(pick, record)
    labels = [m["label"] for m in record["masks"]]
    if pick.label not in labels:
        raise InvalidCaseData(f"record {pick.record} has no mask {pick.label!r} (it has {labels})")
    return CaseDraft(
        title=pick.title,
        slug=_slug(pick),
        modality=record["modality"],
        anatomy=record.get("organ") or topic.anatomy,
        plane=record.get("plane") or topic.plane,
        difficulty=pick.difficulty,
        vignette=topic.vignette,
        findings=topic.findings,
        discussion=topic.discussion,
        key_points=topic.key_points,
        tags=topic.tags
        + (("simulated",) if record.get("synthetic") and "simulated" not in topic.tags else ()),
        source=_source_text(record),
        provenance=_provenance_text(record, pick.label),
        licence=record["licence"],
        synthetic=bool(record.get("synthetic")),
        published=True,
        window_preset=topic.window_preset,
        images=(_image(record, assets_dir),),
        questions=_questions(pick, topic),
    )


def _topic_for(pick: Pick, record: Mapping[str, Any]) -> Topic:
    topic = TOPICS[pick.topic]
    plane = record.get("plane")
    if pick.topic == "mni-brain" and plane in PLANE_QUESTION:
        topic = replace(topic, closed=PLANE_QUESTION[plane])
    return topic


def _slug(pick: Pick) -> str:
    label = pick.label.lower().replace("&", "and").replace(" ", "-")
    return f"starter-{pick.record}-{label}"[:120]


def _image(record: Mapping[str, Any], assets_dir: Path) -> ImageDraft:
    pixels = _read_png(assets_dir / record["image"], mode="RGB")
    masks = tuple(
        MaskDraft(m["label"], _read_png(assets_dir / m["path"], mode="L") > 0) for m in record["masks"]
    )
    spacing = record.get("spacing_mm")
    return ImageDraft(
        pixels=pixels,
        masks=masks,
        spacing_mm=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        description=f"{record['modality']} — {record['id']}",
    )


def _read_png(path: Path, mode: str) -> np.ndarray:
    with PILImage.open(path) as image:
        return np.asarray(image.convert(mode), dtype=np.uint8)


def _questions(pick: Pick, topic: Topic) -> tuple[QuestionDraft, ...]:
    closed = QuestionDraft(
        kind="closed",
        prompt=topic.closed.prompt,
        reference_answer=topic.closed.answer,
        synonyms=topic.closed.synonyms,
        choices=topic.closed.choices,
    )
    segment = QuestionDraft(
        kind="segmentation",
        prompt=f"Please segment the {pick.label} in this image.",
        reference_answer=pick.label,
        target_label=pick.label,
    )
    if topic.open is None:
        return closed, segment
    opened = QuestionDraft(
        kind="open",
        prompt=topic.open.prompt,
        reference_answer=topic.open.answer,
        synonyms=topic.open.synonyms,
    )
    return closed, segment, opened


def _source_text(record: Mapping[str, Any]) -> str:
    source = record.get("source") or {}
    if isinstance(source, Mapping):
        parts = [str(source.get(k)) for k in ("package", "file", "slice") if source.get(k)]
        return " / ".join(parts) or str(record.get("source_group", "assets/medimages"))
    return str(source)


def _provenance_text(record: Mapping[str, Any], label: str) -> str:
    methods = {m["label"]: m.get("method", "see assets/medimages/PROVENANCE.md") for m in record["masks"]}
    lines = [
        f"Image: assets/medimages/{record['image']} (record {record['id']}, group {record.get('source_group')}).",
        f"Reference mask '{label}': {methods[label]}.",
        "Derived 2-D cut of an image shipped in a pip package; see assets/medimages/PROVENANCE.md.",
    ]
    if record.get("synthetic"):
        lines.append("SIMULATED: the lesion was painted into a real image; it is not a real finding.")
    return "\n".join(lines)
