"""Region and yes/no questions drawn afresh at every training step, on train images only.

The written corpus (`training.corpus`) asks about one fixed point, box and sketch per mask, the prompts a
user would draw; a few hundred such regions teach a small model the answer prior rather than to read the
region. Here every draw places a new point (anywhere in a mask or in the image), jitters a box, or
erodes/dilates/cuts a sketch, and the answer is recomputed with the corpus's own rule
(`training.corpus.region_label`), in the corpus's own wording, so the task is unchanged and only the
regions vary. Presence questions ("Is any X visible?") are drawn over every present and absent label
instead of one of each per image, and region-conditioned grounding ("Please segment the structure in the marked
region.") gets fresh regions the same way, its target the mask of the structure the region holds. Val and test
samples are never generated here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from engine.processing import region_grid
from training.corpus import (
    NO_STRUCTURE_ANSWER,
    PRESENCE_QUESTIONS,
    REGION_SEGMENT_QUESTIONS,
    REGION_WHAT_QUESTIONS,
    REGION_YESNO_QUESTIONS,
    SEG_TOKEN,
    absent_labels,
    load_index,
    point_in_label_answer,
    region_label,
)
from training.sources import POINT_HALF_PX, square

KINDS = ("point", "box", "sketch")
KIND_WEIGHTS = (0.5, 0.2, 0.3)
POINT_IN_MASK = 0.7  # share of points placed inside a mask (the rest: anywhere in the image)
YES_NO_SHARE = 0.3  # share of labelled points asked as "Is the X inside ...?"
MAX_TRIES = 8


@dataclass(frozen=True)
class OnlineImage:
    """One train image with its masks: image (H, W, 3) uint8, masks label -> (H, W) bool in record order."""

    modality: str
    image: np.ndarray
    masks: dict[str, np.ndarray]
    absent: tuple[str, ...]
    source: str = ""  # the image's path in the corpus (MeCoVQA's `image` field)

    @cached_property  # asked at every region draw
    def union(self) -> np.ndarray:
        return np.logical_or.reduce(list(self.masks.values()))


@dataclass(frozen=True)
class OnlineSample:
    """A drawn question: `question` holds `<region>` (no path) where the region goes."""

    task: str  # "region" | "complex" | "region_grounding"
    modality: str
    question: str
    answer: str
    image: np.ndarray
    region: np.ndarray | None
    gt: np.ndarray | None = None  # region_grounding: the mask of the structure under the region
    label: str | None = None  # ... and its name


def load_online_images(assets: Path) -> list[OnlineImage]:
    """The train records of `<assets>/index.json` with their image and mask arrays."""
    records = load_index(assets)
    absent = absent_labels(records)
    out = []
    for r in records:
        if r["split"] != "train" or not r["masks"]:
            continue
        image = np.asarray(Image.open(assets / r["image"]).convert("RGB"))
        masks = {m["label"]: np.asarray(Image.open(assets / m["path"]).convert("L")) > 127 for m in r["masks"]}
        out.append(OnlineImage(modality=r["modality"], image=image, masks=masks, absent=tuple(absent[r["id"]]),
                               source=r["image"]))
    return out


def _question(template: str, **kw: str) -> str:
    return template.format(region="", **kw).replace("<region></region>", "<region>")


def background_answer(labels: list[str]) -> str:
    return "The region shows background; none of the " + ", ".join(labels) + " is inside it."


def draw_region(item: OnlineImage, rng: random.Random) -> tuple[str, np.ndarray] | None:
    """(kind, (H, W) bool region) of a random kind, or None when the draw missed (too small, off the grid)."""
    kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
    labels = list(item.masks)
    mask = item.masks[rng.choice(labels)]
    h, w = mask.shape
    if kind == "point":
        where = mask if rng.random() < POINT_IN_MASK and mask.any() else np.ones_like(mask)
        rows, cols = np.nonzero(where)
        k = rng.randrange(rows.size)
        region = square(mask.shape, int(rows[k]), int(cols[k]), POINT_HALF_PX)
    elif kind == "box":
        rows, cols = np.nonzero(mask)
        if rows.size == 0:
            return None
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        jh, jw = max(1, int(0.05 * (bottom - top + 1))), max(1, int(0.05 * (right - left + 1)))
        top, bottom = np.clip([top + rng.randint(-jh, jh), bottom + rng.randint(-jh, jh)], 0, h - 1)
        left, right = np.clip([left + rng.randint(-jw, jw), right + rng.randint(-jw, jw)], 0, w - 1)
        region = np.zeros_like(mask)
        region[min(top, bottom): max(top, bottom) + 1, min(left, right): max(left, right) + 1] = True
    else:
        region = mask.copy()
        change = rng.choice(("as drawn", "eroded", "dilated", "cut"))
        if change == "eroded":
            region = ndi.binary_erosion(region, iterations=rng.randint(1, 2)) if region.sum() > 200 else region
        elif change == "dilated":
            region = ndi.binary_dilation(region, iterations=rng.randint(1, 2))
        elif change == "cut":  # the part of the sketch inside a random disc (a partial sketch)
            rows, cols = np.nonzero(region)
            if rows.size:
                k = rng.randrange(rows.size)
                radius = rng.uniform(0.25, 0.6) * max(h, w)
                yy, xx = np.ogrid[:h, :w]
                region &= (yy - rows[k]) ** 2 + (xx - cols[k]) ** 2 <= radius ** 2
    if not region.any() or not region_grid(region).any():
        return None
    return kind, region


def region_sample(item: OnlineImage, rng: random.Random) -> OnlineSample | None:
    """One region question about a fresh region, answered by the corpus rule; None if the draw was unusable."""
    for _ in range(MAX_TRIES):
        drawn = draw_region(item, rng)
        if drawn is None:
            continue
        kind, region = drawn
        labels = list(item.masks)
        touches = bool((region & item.union).any())
        if kind == "point" and rng.random() < YES_NO_SHARE:
            label = rng.choice(labels)
            return OnlineSample("region", item.modality, _question(rng.choice(REGION_YESNO_QUESTIONS), label=label),
                                point_in_label_answer(region, item.masks[label]), item.image, region)
        if kind == "point" and not touches:
            answer = background_answer(labels)
        else:
            label = region_label(region, item.masks)
            if label is None:
                continue
            answer = f"The region shows the {label}."
        return OnlineSample("region", item.modality, _question(rng.choice(REGION_WHAT_QUESTIONS)), answer,
                            item.image, region)
    return None


def presence_sample(item: OnlineImage, rng: random.Random) -> OnlineSample:
    """"Is any X visible?" over all present (yes) and absent (no) labels, half and half."""
    present = rng.random() < 0.5 or not item.absent
    label = rng.choice(list(item.masks)) if present else rng.choice(item.absent)
    return OnlineSample("complex", item.modality, rng.choice(PRESENCE_QUESTIONS).format(label=label),
                        "yes" if present else "no", item.image, None)


def region_grounding_sample(item: OnlineImage, rng: random.Random, negatives: bool = True) -> OnlineSample | None:
    """"Please segment the structure in the marked region." about a fresh region: `<SEG>` with the mask of the
    structure the region holds (`region_label`, the region questions' rule), or, for a point that touches no mask
    (only when `negatives`), `NO_STRUCTURE_ANSWER` in words and no mask. None if no usable region was drawn."""
    for _ in range(MAX_TRIES):
        drawn = draw_region(item, rng)
        if drawn is None:
            continue
        kind, region = drawn
        question = _question(rng.choice(REGION_SEGMENT_QUESTIONS))
        if kind == "point" and not (region & item.union).any():
            if not negatives:
                continue
            return OnlineSample("region_grounding", item.modality, question, NO_STRUCTURE_ANSWER, item.image, region)
        label = region_label(region, item.masks)
        if label is None:
            continue
        return OnlineSample("region_grounding", item.modality, question, SEG_TOKEN, item.image, region,
                            gt=item.masks[label], label=label)
    return None
