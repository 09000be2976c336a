"""Build a MeCoVQA-format mini corpus (complex VQA with descriptions, region VQA, grounding, region-conditioned
grounding) from an asset folder.

Reads `<assets>/index.json` written by `training.sources` and writes, for each split in train/val/test:
`<split>.json` (all three tasks, like `MeCoVQA_train.json`) and `MeCoVQA_Complex_VQA_<split>.json`,
`MeCoVQA_Region_VQA_<split>.json`, `MeCoVQA_Grounding_<split>.json`, `MeCoVQA_Region_Grounding_<split>.json`. Every path in a sample is relative to
the asset folder (use it as `--image_folder`). Sample format (reference/medplib.md section 7.2):

    {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                      {"from": "gpt", "value": "..."}],
     "answer_type": "open" | "closed", "modality",
     "task": "complex" | "region" | "grounding" | "region_grounding", ["kind": "describe"]}

Region questions carry `<region>regions/...png</region>` (a point square, a box, or `masks/...png` as a
sketch); grounding answers are `<SEG><mask>masks/...png</mask>`. Region-conditioned grounding asks for the
structure under a region ("Please segment the structure in the marked region. <region>...</region>"): `<SEG>` and
its mask, or, for a background point, `NO_STRUCTURE_ANSWER` in words. Descriptions ("Describe the image.") are
open complex questions with `"kind": "describe"`, answered in complete sentences (`describe_answer`). Splits come from the `split` field of
each index record (decided per source slice by `training.sources.assign_splits`). Deterministic: one
`random.Random(seed)` walks the records in id order for the first three tasks; descriptions and region-conditioned
grounding draw from a generator per record, so adding them left the other samples unchanged.

Usage: `python -m training.corpus --assets assets/medimages --out <dir> [--ci-subset]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine.conversation import REGION_SEGMENT_QUESTION
from engine.processing import region_grid

log = logging.getLogger(__name__)

SEED = 20250101
SPLITS = ("train", "val", "test")
TASK_FILES = {"complex": "MeCoVQA_Complex_VQA", "region": "MeCoVQA_Region_VQA", "grounding": "MeCoVQA_Grounding",
              "region_grounding": "MeCoVQA_Region_Grounding"}
GROUNDING_TASKS = ("grounding", "region_grounding")  # tasks answered by the grounding expert
CI_SUBSET_NAME = "ci_subset.json"
CI_PER_TASK_AND_MODALITY = 4
CI_DESCRIPTIONS_PER_MODALITY = 2
SEG_TOKEN = "<SEG>"

MODALITY_QUESTIONS = (
    "What imaging modality was used to acquire this image?",
    "Which modality is shown in this image?",
    "What kind of medical image is this?",
    "Identify the imaging technique used here.",
)
ORGAN_QUESTIONS = (
    "Which organ or body region is shown in this image?",
    "What part of the body does this image show?",
    "Which anatomical region is depicted?",
)
PLANE_QUESTIONS = (
    "In which plane was this image acquired?",
    "What is the imaging plane of this slice?",
    "Is this an axial, coronal or sagittal image?",
)
PRESENCE_QUESTIONS = (
    "Is any {label} visible in this image?",
    "Does this image show {label}?",
    "Can {label} be seen in this image?",
)
REGION_WHAT_QUESTIONS = (
    "What structure is inside <region>{region}</region>?",
    "Please describe what is in the marked region <region>{region}</region>.",
    "What does the region <region>{region}</region> show?",
)
REGION_YESNO_QUESTIONS = (
    "Is the {label} inside <region>{region}</region>?",
    "Does the region <region>{region}</region> contain {label}?",
)
GROUNDING_QUESTIONS = (
    "Please segment the {label} in this image.",
    "Can you segment the {label} in this image?",
    "Segment the {label}.",
    "Where is the {label}? Please output the segmentation mask.",
    "Please delineate the {label} in this image.",
)

# Descriptions (MeCoVQA-C's descriptive questions): complete sentences from what the record knows.
DESCRIBE_QUESTIONS = (
    "Describe the image.",
    "Please describe this image.",
    "What does this image show?",
    "Summarise the findings.",
    "Can you describe this image?",
    "Give a short description of this image.",
)
DESCRIBE_KIND = "describe"  # the sample's "kind": `engine evaluate` scores these with describe_f1
MODALITY_PHRASES = {
    "MRI": "an MRI image", "CT": "a CT image", "nuclear medicine": "a nuclear medicine scan",
    "fundus photography": "a fundus photograph", "histopathology": "a histopathology image",
    "fluorescence microscopy": "a fluorescence microscopy image", "phase microscopy": "a phase microscopy image",
}
DESCRIBE_OPENINGS = (
    "This is {modality}{organ}{plane}.",
    "The image is {modality}{organ}{plane}.",
    "This appears to be {modality}{organ}{plane}.",
)
DESCRIBE_STRUCTURES = (
    "The {labels} {verb} visible.",
    "It shows the {labels}.",
    "Visible structures include the {labels}.",
)
PLURAL_LABELS = frozenset({"nuclei", "retinal vessels"})
FINDINGS = {"lesion": "a lesion", "liver lesion": "a liver lesion", "high tracer uptake": "areas of high tracer uptake"}
DESCRIBE_FINDINGS = (
    "It also shows {finding}.",
    "The finding is {finding}.",
    "There is also {finding}.",
)

# Region-conditioned grounding (MeCoVQA-G with a region prompt): the first question is the portal's own.
REGION_SEGMENT_QUESTIONS = (
    REGION_SEGMENT_QUESTION + " <region>{region}</region>",
    "Segment the structure inside <region>{region}</region>.",
    "Please segment what is in the marked region <region>{region}</region>.",
)
NO_STRUCTURE_ANSWER = "The marked region shows background; there is no labelled structure to segment in it."


@dataclass(frozen=True)
class Sample:
    """One MeCoVQA-style question/answer pair about one image."""

    id: str
    image: str
    question: str
    answer: str
    answer_type: str
    modality: str
    task: str
    kind: str | None = None  # "describe" for descriptions

    def to_json(self) -> dict:
        return {
            "id": self.id, "image": self.image,
            "conversations": [{"from": "human", "value": "<image>\n" + self.question},
                              {"from": "gpt", "value": self.answer}],
            "answer_type": self.answer_type, "modality": self.modality, "task": self.task,
            **({"kind": self.kind} if self.kind else {}),
        }


def load_index(assets: Path) -> list[dict]:
    """The records of `<assets>/index.json`, sorted by id. Raises with a fix if the folder is not built."""
    path = assets / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build it with `python -m training.sources --out {assets}`")
    return sorted(json.loads(path.read_text()), key=lambda r: r["id"])


def _group(record: dict) -> tuple[str, str | None]:
    return record["modality"], record["organ"]


def absent_labels(records: list[dict]) -> dict[str, list[str]]:
    """Record id -> labels that are truly absent from that image, for "no" answers.

    A label counts as absent when it never occurs in images of the same (modality, organ) group (a liver
    lesion on a brain slice), or when it only ever occurs painted into synthetic records and this image is
    not synthetic (the MNI template is a healthy brain: its unaltered slices have no lesion).
    """
    by_group: dict[tuple, set[str]] = {}
    for r in records:
        by_group.setdefault(_group(r), set()).update(m["label"] for m in r["masks"])
    all_labels = set().union(*by_group.values())
    real = {m["label"] for r in records if not r["synthetic"] for m in r["masks"]}
    synthetic_only = {m["label"] for r in records if r["synthetic"] for m in r["masks"]} - real
    out = {}
    for r in records:
        absent = all_labels - by_group[_group(r)]
        if not r["synthetic"]:
            absent |= synthetic_only & by_group[_group(r)]
        out[r["id"]] = sorted(absent)
    return out


def complex_samples(record: dict, absent: list[str], rng: random.Random) -> list[Sample]:
    """Open modality/organ/plane questions and closed yes/no presence questions about one image."""
    make = _maker(record, "complex")
    out = [make(rng.choice(MODALITY_QUESTIONS), f"The modality is {record['modality']}.", "open")]
    if record["organ"]:
        out.append(make(rng.choice(ORGAN_QUESTIONS), f"The image shows the {record['organ']}.", "open"))
    if record["plane"]:
        out.append(make(rng.choice(PLANE_QUESTIONS), f"The image is in the {record['plane']} plane.", "open"))
    present = rng.choice(record["masks"])["label"]
    out.append(make(rng.choice(PRESENCE_QUESTIONS).format(label=present), "yes", "closed"))
    if absent:
        out.append(make(rng.choice(PRESENCE_QUESTIONS).format(label=rng.choice(absent)), "no", "closed"))
    return out


def join_labels(labels: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def describe_answer(modality: str, organ: str | None, plane: str | None, labels: list[str],
                    rng: random.Random) -> str:
    """Two or three complete sentences: modality, organ and plane; the visible structures; the finding if any.
    The wording is drawn from a few templates so the model does not learn one string."""
    phrase = MODALITY_PHRASES.get(modality, f"a {modality} image")
    opening = rng.choice(DESCRIBE_OPENINGS).format(
        modality=phrase, organ=f" of the {organ}" if organ else "", plane=f" in the {plane} plane" if plane else "")
    structures = [lab for lab in labels if lab not in FINDINGS]
    findings = [FINDINGS[lab] for lab in labels if lab in FINDINGS]
    sentences = [opening]
    if structures:
        sentences.append(rng.choice(DESCRIBE_STRUCTURES).format(
            labels=join_labels(structures), verb="are" if len(structures) > 1 or structures[0] in PLURAL_LABELS else "is"))
    if findings:
        sentences.append(rng.choice(DESCRIBE_FINDINGS).format(finding=join_labels(findings)))
    return " ".join(sentences)


def describe_samples(record: dict, rng: random.Random) -> list[Sample]:
    """One descriptive question ("Describe the image.", ...) answered by `describe_answer`."""
    make = _maker(record, "complex", DESCRIBE_KIND)
    answer = describe_answer(record["modality"], record["organ"], record["plane"],
                             [m["label"] for m in record["masks"]], rng)
    return [make(rng.choice(DESCRIBE_QUESTIONS), answer, "open")]


def region_grounding_samples(record: dict, assets: Path, rng: random.Random) -> list[Sample]:
    """"Please segment the structure in the marked region." with a point, box or sketch of each mask: the answer
    is `<SEG>` with the mask of the structure the region holds (`region_label`, as the region questions decide it);
    the background point is answered in words (`NO_STRUCTURE_ANSWER`), with no mask. Ambiguous regions and regions
    that cover no CLIP patch are skipped."""
    make = _maker(record, "region_grounding")
    masks = {m["label"]: _png(assets, m["path"]) for m in record["masks"]}
    paths = {m["label"]: m["path"] for m in record["masks"]}
    out = []
    for mask in record["masks"]:
        kind = rng.choice(("point", "box", "sketch"))
        region = mask["path"] if kind == "sketch" else mask["regions"][kind]
        template = rng.choice(REGION_SEGMENT_QUESTIONS)
        region_px = _png(assets, region)
        label = region_label(region_px, masks)
        if label is not None and region_grid(region_px).any():
            out.append(make(template.format(region=region), f"{SEG_TOKEN}<mask>{paths[label]}</mask>", "open"))
    background = record["background_region"]
    if background and region_grid(_png(assets, background)).any():
        out.append(make(rng.choice(REGION_SEGMENT_QUESTIONS).format(region=background), NO_STRUCTURE_ANSWER, "open"))
    return out


def region_samples(record: dict, assets: Path, rng: random.Random) -> list[Sample]:
    """Region VQA: name the structure inside a point/box/sketch region; yes/no with a wrong label;
    and a background point as a negative.

    The answer is what the region holds, not which mask it was cut from: the most specific label (smallest
    mask) whose mask covers most of the region (the innermost point of "brain" lies in white matter, the box
    of "grey matter" is the box of "brain"). Regions no label clearly holds, or that cover no CLIP patch
    after the 336 resize (the engine refuses them), are skipped.
    """
    make = _maker(record, "region")
    labels = [m["label"] for m in record["masks"]]
    masks = {m["label"]: _png(assets, m["path"]) for m in record["masks"]}
    out = []
    for mask in record["masks"]:
        kind = rng.choice(("point", "box", "sketch"))
        region = mask["path"] if kind == "sketch" else mask["regions"][kind]
        template = rng.choice(REGION_WHAT_QUESTIONS)
        region_px = _png(assets, region)
        answer = region_label(region_px, masks)
        if answer is not None and region_grid(region_px).any():
            out.append(make(template.format(region=region), f"The region shows the {answer}.", "open"))
        others = [lab for lab in labels if lab != mask["label"]]
        if others and kind == "point":
            wrong = rng.choice(others)
            yes_no = rng.choice(REGION_YESNO_QUESTIONS)
            if region_grid(region_px).any():
                out.append(make(yes_no.format(label=wrong, region=region),
                                point_in_label_answer(region_px, masks[wrong]), "closed"))
    if record["background_region"] and region_grid(_png(assets, record["background_region"])).any():
        out.append(make(rng.choice(REGION_WHAT_QUESTIONS).format(region=record["background_region"]),
                        "The region shows background; none of the " + ", ".join(labels) + " is inside it.",
                        "open"))
    return out


REGION_HOLDS = 0.6  # a label answers a region question when its mask covers at least this share of the region
REGION_AMBIGUOUS = 0.4  # ... and no more specific label covers between REGION_AMBIGUOUS and REGION_HOLDS of it


def region_label(region: np.ndarray, masks: dict[str, np.ndarray]) -> str | None:
    """The one right answer to "what is in this (H, W) bool region": the smallest mask covering >= 60 % of
    it; None when no mask does, or when a smaller mask covers 40-60 % of it (ambiguous)."""
    total = max(int(region.sum()), 1)
    by_size = sorted(masks, key=lambda lab: int(masks[lab].sum()))
    for label in by_size:
        share = (region & masks[label]).sum() / total
        if share >= REGION_HOLDS:
            return label
        if share > REGION_AMBIGUOUS:
            return None
    return None


def _png(assets: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(assets / rel).convert("L")) > 127


def point_in_label_answer(point: np.ndarray, inside: np.ndarray) -> str:
    """'yes'/'no': whether most of the (H, W) point region lies inside the other label's mask (nested
    labels, e.g. white matter inside brain, make this 'yes')."""
    return "yes" if (point & inside).sum() * 2 > point.sum() else "no"


def grounding_samples(record: dict, rng: random.Random) -> list[Sample]:
    """One "segment the X" question per mask; the answer is `<SEG><mask>path</mask>`."""
    make = _maker(record, "grounding")
    return [make(rng.choice(GROUNDING_QUESTIONS).format(label=m["label"]),
                 f"{SEG_TOKEN}<mask>{m['path']}</mask>", "open") for m in record["masks"]]


def _maker(record: dict, task: str, kind: str | None = None) -> Callable[[str, str, str], Sample]:
    counter = iter(range(10_000))
    prefix = kind or task

    def make(question: str, answer: str, answer_type: str) -> Sample:
        return Sample(id=f"{prefix}-{record['id']}-{next(counter)}", image=record["image"], question=question,
                      answer=answer, answer_type=answer_type, modality=record["modality"], task=task, kind=kind)

    return make


def build_corpus(assets: Path, seed: int = SEED) -> dict[str, dict[str, list[dict]]]:
    """split -> task -> list of sample dicts, from `<assets>/index.json`. Deterministic for a given seed."""
    records = load_index(assets)
    absent = absent_labels(records)
    rng = random.Random(seed)
    corpus: dict[str, dict[str, list[dict]]] = {s: {t: [] for t in TASK_FILES} for s in SPLITS}
    for record in records:
        split = corpus[record["split"]]
        split["complex"] += [s.to_json() for s in complex_samples(record, absent[record["id"]], rng)]
        split["region"] += [s.to_json() for s in region_samples(record, assets, rng)]
        split["grounding"] += [s.to_json() for s in grounding_samples(record, rng)]
        extra = random.Random(f"{seed}:{record['id']}")  # the new tasks draw apart: the others stay as they were
        split["complex"] += [s.to_json() for s in describe_samples(record, extra)]
        split["region_grounding"] += [s.to_json() for s in region_grounding_samples(record, assets, extra)]
    return corpus


def ci_subset(corpus: dict[str, dict[str, list[dict]]]) -> list[dict]:
    """A tiny fixed subset of the test split: the first CI_PER_TASK_AND_MODALITY samples per task and modality
    (descriptions, a kind of complex question, count apart: CI_DESCRIPTIONS_PER_MODALITY of them)."""
    picked, seen = [], {}
    for task, samples in corpus["test"].items():
        for sample in samples:
            key = (task, sample.get("kind"), sample["modality"])
            limit = CI_DESCRIPTIONS_PER_MODALITY if sample.get("kind") == DESCRIBE_KIND else CI_PER_TASK_AND_MODALITY
            if seen.get(key, 0) < limit:
                seen[key] = seen.get(key, 0) + 1
                picked.append(sample)
    return picked


def _dump(data: list[dict], path: Path) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def write_corpus(corpus: dict[str, dict[str, list[dict]]], out: Path) -> None:
    """Write `<split>.json` and the per-task MeCoVQA_* files under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for split, tasks in corpus.items():
        _dump([s for task in TASK_FILES for s in tasks[task]], out / f"{split}.json")
        for task, stem in TASK_FILES.items():
            _dump(tasks[task], out / f"{stem}_{split}.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, required=True, help="folder written by training.sources")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON files")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--ci-subset", action="store_true",
                        help=f"also write <assets>/{CI_SUBSET_NAME}, a tiny fixed test subset for CI")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    corpus = build_corpus(args.assets, args.seed)
    write_corpus(corpus, args.out)
    if args.ci_subset:
        _dump(ci_subset(corpus), args.assets / CI_SUBSET_NAME)
    for split, tasks in corpus.items():
        log.info("%s: %s", split, ", ".join(f"{t} {len(s)}" for t, s in tasks.items()))


if __name__ == "__main__":
    main()
