"""Quiz scoring: Dice and IoU against hand-computed values, and answer matching."""

from __future__ import annotations

import numpy as np
import pytest

from cases.errors import InvalidCaseData
from cases.scoring import answer_matches, dice, iou, overlap


def test_hand_computed_dice_and_iou() -> None:
    # reference: 4x4 block = 16 px; drawn: 4x2 block overlapping 8 px of it plus 4 px outside.
    reference = np.zeros((8, 8), bool)
    reference[2:6, 2:6] = True
    drawn = np.zeros((8, 8), bool)
    drawn[2:6, 4:7] = True  # 12 px, 8 inside the reference
    result = overlap(drawn, reference)
    assert (result.intersection, result.predicted, result.reference) == (8, 12, 16)
    assert result.dice == pytest.approx(2 * 8 / (12 + 16))  # 0.5714...
    assert result.iou == pytest.approx(8 / 20)  # union = 12 + 16 - 8


def test_identical_disjoint_and_empty_masks() -> None:
    a = np.zeros((5, 5), bool)
    a[1:3, 1:3] = True
    b = np.zeros((5, 5), bool)
    b[3:, 3:] = True
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0
    assert dice(a, b) == 0.0 and iou(a, b) == 0.0
    empty = np.zeros((5, 5), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0  # documented convention
    assert dice(empty, a) == 0.0 and dice(a, empty) == 0.0


def test_non_bool_masks_count_non_zero_pixels() -> None:
    a = np.array([[0, 255], [0, 1]], np.uint8)
    b = np.array([[0, 1], [1, 0]], np.uint8)
    assert dice(a, b) == pytest.approx(2 * 1 / (2 + 2))


def test_different_sizes_are_refused() -> None:
    with pytest.raises(InvalidCaseData, match="same size"):
        dice(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def test_answer_matching_is_forgiving_about_case_and_punctuation() -> None:
    assert answer_matches("  White-Matter. ", "white matter")
    assert answer_matches("hematoxylin", "haematoxylin", ("hematoxylin",))
    assert not answer_matches("", "yes")
    assert not answer_matches("grey matter", "white matter")
