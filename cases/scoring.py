"""Overlap scores of a drawn mask against a reference mask.

Both-empty convention: when the reference and the drawn mask are both empty the student correctly
found "nothing", so Dice = IoU = 1.0. When exactly one is empty the overlap is 0, so Dice = IoU = 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cases.errors import InvalidCaseData


@dataclass(frozen=True)
class Overlap:
    """Dice = 2|A∩B| / (|A|+|B|), IoU = |A∩B| / |A∪B|, plus the pixel counts they come from."""

    dice: float
    iou: float
    intersection: int
    predicted: int
    reference: int


def overlap(predicted: np.ndarray, reference: np.ndarray) -> Overlap:
    """Dice and IoU of two (H, W) masks (bool, or any dtype where non-zero = inside).

    Raises InvalidCaseData when the shapes differ (resize the drawing to the image size first).
    """
    if predicted.shape != reference.shape or predicted.ndim != 2:
        raise InvalidCaseData(
            f"masks must be 2-D and the same size to be compared, got {predicted.shape} and {reference.shape}"
        )
    a = np.asarray(predicted).astype(bool)
    b = np.asarray(reference).astype(bool)
    inter = int(np.logical_and(a, b).sum())
    n_a, n_b = int(a.sum()), int(b.sum())
    union = n_a + n_b - inter
    if n_a + n_b == 0:
        return Overlap(dice=1.0, iou=1.0, intersection=0, predicted=0, reference=0)
    return Overlap(
        dice=2.0 * inter / (n_a + n_b), iou=inter / union, intersection=inter, predicted=n_a, reference=n_b
    )


def dice(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Dice coefficient in [0, 1] of two (H, W) masks; both empty → 1.0 (see module docstring)."""
    return overlap(predicted, reference).dice


def iou(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Intersection over union in [0, 1] of two (H, W) masks; both empty → 1.0."""
    return overlap(predicted, reference).iou


def normalise_answer(text: str) -> str:
    """Lower-case, trim, collapse spaces and drop trailing punctuation, for answer matching."""
    return " ".join(text.lower().replace("-", " ").split()).strip(" .!?;:,")


def answer_matches(answer: str, reference: str, synonyms: tuple[str, ...] = ()) -> bool:
    """True when `answer` equals the reference answer or an accepted synonym after normalisation."""
    given = normalise_answer(answer)
    return bool(given) and given in {normalise_answer(s) for s in (reference, *synonyms)}
