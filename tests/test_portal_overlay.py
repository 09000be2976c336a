"""Portal drawing and bookkeeping without the model: overlays, markers, region marks, routing plot."""

from __future__ import annotations

import numpy as np
import pytest

from engine import processing
from portal import texts
from portal.overlay import draw_marks, model_input_view, outline, overlay_mask
from portal.regions import Mark, RegionMarks
from portal.routing_plot import expert_shares, routing_figure


def _square_mask() -> np.ndarray:
    mask = np.zeros((40, 50), bool)
    mask[10:30, 15:35] = True
    return mask


def test_fill_blends_only_inside_the_mask():
    rgb = np.full((40, 50, 3), 100, np.uint8)
    out = overlay_mask(rgb, _square_mask(), color=(200, 0, 0), opacity=0.5, style="fill")
    assert tuple(out[20, 25]) == (150, 50, 50) and tuple(out[0, 0]) == (100, 100, 100)


def test_outline_paints_the_boundary_only():
    rgb = np.zeros((40, 50, 3), np.uint8)
    out = overlay_mask(rgb, _square_mask(), color=(0, 255, 0), style="outline")
    assert tuple(out[10, 20]) == (0, 255, 0) and tuple(out[20, 25]) == (0, 0, 0)
    edge = outline(_square_mask())
    assert edge.sum() == 2 * 20 + 2 * 18  # the square's perimeter, one pixel wide


def test_overlay_refuses_mismatched_mask_and_unknown_style():
    rgb = np.zeros((40, 50, 3), np.uint8)
    with pytest.raises(ValueError, match="does not match"):
        overlay_mask(rgb, np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match="style"):
        overlay_mask(rgb, _square_mask(), style="glow")


def test_markers_are_drawn_without_touching_the_input():
    rgb = np.zeros((60, 60, 3), np.uint8)
    marks = (Mark("point", (10, 10, 10, 10)), Mark("box", (20, 20, 50, 40)))
    out = draw_marks(rgb, marks, pending=(5, 50))
    assert rgb.max() == 0
    assert tuple(out[20, 35]) == texts.MARK_COLOR  # active box edge in the mark colour
    assert tuple(out[10, 10]) == (160, 160, 160)  # older point in grey
    assert tuple(out[50, 5]) == texts.MARK_COLOR  # pending corner cross


def test_region_marks_replace_undo_and_boxes():
    marks = RegionMarks().click("Point", 3, 4).click("Point", 7, 8)
    assert marks.active == Mark("point", (7, 8, 7, 8))
    assert marks.undo().active.point == (3, 4)
    box = marks.click("Box", 30, 5)
    assert box.pending == (30, 5) and box.active.point == (7, 8)
    done = box.click("Box", 10, 25)
    assert done.active == Mark("box", (10, 5, 30, 25)) and done.pending is None
    assert box.undo().pending is None and box.undo().active == marks.active
    assert marks.click("None", 1, 1) is marks


def test_model_input_view_matches_clip_preprocess():
    rgb = (np.random.default_rng(0).random((60, 120, 3)) * 255).astype(np.uint8)
    view = model_input_view(rgb)
    normalised = (view.astype(np.float32) / 255 - np.asarray(processing.CLIP_MEAN, np.float32)) / np.asarray(
        processing.CLIP_STD, np.float32
    )
    np.testing.assert_allclose(normalised.transpose(2, 0, 1), processing.clip_preprocess(rgb), atol=1e-5)


def test_routing_figure_has_layers_by_tokens():
    experts = ((0, 1, 1), (1, 1, 0))
    figure = routing_figure(experts, ["Hello", " world", "</s>"], n_experts=2)
    heatmap = figure.data[0]
    assert np.asarray(heatmap.z).shape == (2, 3)
    assert list(heatmap.x) == ["0: 'Hello'", "1: ' world'", "2: '</s>'"]
    assert list(heatmap.y) == ["layer 0", "layer 1"]
    assert expert_shares(experts, 2) == [pytest.approx(1 / 3), pytest.approx(2 / 3)]
    with pytest.raises(ValueError, match="token labels"):
        routing_figure(experts, ["a"], n_experts=2)


def test_old_answer_folders_are_pruned(tmp_path):
    import os
    import time

    from portal.exports import prune_exports

    old, new = tmp_path / "answer-old", tmp_path / "answer-new"
    for folder in (old, new):
        folder.mkdir()
        (folder / "mask.png").write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    prune_exports(tmp_path, 3600)
    assert not old.exists() and new.exists()
