"""The bundled medical image assets (assets/medimages) and the MeCoVQA-format corpus built from them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.results import answer_is_unfinished
from training import corpus as corpus_mod
from training.sources import MAX_SIDE, SPLITS, Extracted, assign_splits, guarded_tiles, prompt_regions

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "medimages"
RECORD_KEYS = {"id", "image", "masks", "modality", "organ", "plane", "source", "source_group", "licence",
               "synthetic", "spacing_mm", "split", "split_unit", "background_region"}
MASK_RE = re.compile(r"<mask>(.*?)</mask>")
REGION_RE = re.compile(r"<region>(.*?)</region>")


@pytest.fixture(scope="module")
def index() -> list[dict]:
    return json.loads((ASSETS / "index.json").read_text())


@pytest.fixture(scope="module")
def corpus() -> dict[str, dict[str, list[dict]]]:
    return corpus_mod.build_corpus(ASSETS)


def _png(rel: str) -> np.ndarray:
    with Image.open(ASSETS / rel) as im:
        return np.asarray(im)


def test_index_records_have_the_schema_and_their_files(index: list[dict]) -> None:
    assert len(index) >= 100
    assert len({r["id"] for r in index}) == len(index), "ids must be unique"
    for r in index:
        assert r.keys() >= RECORD_KEYS, r["id"]
        assert {"package", "file", "slice"} <= r["source"].keys()
        assert r["split"] in SPLITS and isinstance(r["synthetic"], bool) and r["masks"]
        assert r["spacing_mm"] is None or len(r["spacing_mm"]) == 2
        assert not Path(r["image"]).is_absolute() and (ASSETS / r["image"]).is_file()
        for m in r["masks"]:
            assert (ASSETS / m["path"]).is_file() and m["label"] and m["method"]


def test_images_are_small_and_masks_are_binary_at_image_size(index: list[dict]) -> None:
    for r in index:
        image = _png(r["image"])
        assert image.dtype == np.uint8 and image.ndim in (2, 3) and max(image.shape[:2]) <= MAX_SIDE
        for m in r["masks"]:
            mask = _png(m["path"])
            assert mask.shape == image.shape[:2], m["path"]
            assert set(np.unique(mask)) <= {0, 255} and mask.any(), m["path"]


def test_assets_cover_five_modalities_and_stay_small(index: list[dict]) -> None:
    modalities = {r["modality"] for r in index}
    assert {"MRI", "CT", "fundus photography", "histopathology", "fluorescence microscopy"} <= modalities
    assert sum(len(r["masks"]) for r in index) >= 300
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= 15 * 2**20, f"assets/medimages is {total / 2**20:.1f} MiB"
    assert "licence" in (ASSETS / "PROVENANCE.md").read_text().lower()


def test_no_source_slice_is_in_two_splits(index: list[dict]) -> None:
    seen: dict[tuple, str] = {}
    for r in index:
        key = (r["source"]["package"], r["source"]["file"], r["source"]["slice"])
        assert seen.setdefault(key, r["split"]) == r["split"], f"{key} is in two splits"
    assert {r["split"] for r in index} == set(SPLITS)


def test_region_prompts_are_inside_their_image_and_touch_the_structure(index: list[dict]) -> None:
    for r in index[::7]:
        for m in r["masks"]:
            mask = _png(m["path"]) > 0
            for rel in m["regions"].values():
                region = _png(rel) > 0
                assert region.shape == mask.shape and (region & mask).any(), rel
        if r["background_region"]:
            union = np.any([_png(m["path"]) > 0 for m in r["masks"]], axis=0)
            assert not (_png(r["background_region"]) > 0)[union].any()


def test_box_prompt_is_not_transposed() -> None:
    """MedPLIB's demo fills boxes with rows and columns swapped; ours must cover the object itself."""
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:10, 30:55] = True  # wide, short object
    box = prompt_regions(mask)["box"]
    assert box.sum() == mask.sum() and (box == mask).all()


def _item(key: str, group: str, unit: int, synthetic: bool = False) -> Extracted:
    return Extracted(key=key, image=np.zeros((4, 4), np.uint8), masks=(), modality="MRI", organ=None,
                     plane="axial", package="p", file="f", slice=str(unit), source_group=group, unit=unit,
                     licence="l", spacing_mm=None, synthetic=synthetic)


def test_splits_are_contiguous_slice_ranges_and_follow_the_source_slice() -> None:
    items = [_item(f"v-{u}", "vol", u) for u in range(0, 100, 5)]
    items += [_item("v-45-synthetic", "vol", 45, synthetic=True), _item("single", "img", 0)]
    splits = assign_splits(items)
    order = [splits[f"v-{u}"] for u in range(0, 100, 5)]
    assert order.count("val") == order.count("test") == 3
    held = [i for i, s in enumerate(order) if s != "train"]
    assert held == [6, 7, 8, 13, 14, 15], "val and test must each be one contiguous block of slices"
    assert splits["v-45-synthetic"] == splits["v-45"], "a synthetic copy shares its slice's split"
    assert splits["single"] == "train"


def test_grounding_answers_point_to_existing_masks(corpus: dict) -> None:
    for split in SPLITS:
        samples = corpus[split]["grounding"]
        assert samples
        for s in samples:
            answer = s["conversations"][1]["value"]
            assert answer.startswith("<SEG>")
            (path,) = MASK_RE.findall(answer)
            assert (ASSETS / path).is_file()


def test_region_questions_reference_existing_masks_and_include_negatives(corpus: dict) -> None:
    answers = []
    for s in (s for split in SPLITS for s in corpus[split]["region"]):
        question = s["conversations"][0]["value"]
        assert question.startswith("<image>\n")
        (path,) = REGION_RE.findall(question)
        assert (ASSETS / path).is_file(), path
        answers.append(s["conversations"][1]["value"])
    assert any(a == "no" for a in answers) and any(a.startswith("The region shows background") for a in answers)


def test_complex_vqa_has_open_and_closed_yes_no(corpus: dict) -> None:
    samples = [s for split in SPLITS for s in corpus[split]["complex"]]
    closed = {s["conversations"][1]["value"] for s in samples if s["answer_type"] == "closed"}
    assert closed == {"yes", "no"}
    assert len({s["conversations"][0]["value"] for s in samples}) >= 10, "several phrasings expected"


def test_corpus_is_deterministic_and_written_in_mecovqa_files(tmp_path: Path, corpus: dict) -> None:
    for run in ("a", "b"):
        corpus_mod.write_corpus(corpus_mod.build_corpus(ASSETS), tmp_path / run)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "MeCoVQA_Grounding_test.json" in names and "train.json" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert json.loads((tmp_path / "a" / "test.json").read_text()) == [
        s for task in corpus_mod.TASK_FILES for s in corpus["test"][task]]


def test_ci_subset_is_a_fixed_slice_of_the_test_split(corpus: dict) -> None:
    committed = json.loads((ASSETS / "ci_subset.json").read_text())
    assert committed == corpus_mod.ci_subset(corpus)
    assert {s["task"] for s in committed} == set(corpus_mod.TASK_FILES)


def test_every_bundled_modality_is_in_the_test_split_with_masks(index: list[dict], corpus: dict) -> None:
    """Issue 20: CT, fundus photography and phase microscopy had one source image each, all in train."""
    modalities = {r["modality"] for r in index}
    for split in ("val", "test"):
        grounded = {s["modality"] for s in corpus[split]["grounding"]}
        assert grounded == modalities, (split, modalities - grounded)
    assert len(modalities) >= 7


def test_guarded_tiles_are_disjoint_and_a_guard_band_apart() -> None:
    tiles = list(guarded_tiles(100, 90, rows=3, cols=3, guard=16))
    assert [t[0] for t in tiles] == list(range(9))
    covered = np.zeros((100, 90), int)
    for _, r0, r1, c0, c1 in tiles:
        covered[r0:r1, c0:c1] += 1
    assert covered.max() == 1
    (_, _, top_r1, _, left_c1), (_, _, _, right_c0, _) = tiles[0], tiles[1]
    assert right_c0 - left_c1 == 16 and tiles[3][1] - top_r1 == 16
    assert tiles[0][1] == tiles[0][3] == 0 and tiles[-1][2] == 100 and tiles[-1][4] == 90  # outer edges kept


def test_tiled_sources_keep_each_tile_in_one_split(index: list[dict]) -> None:
    for prefix in ("ct-pydicom-head-", "fundus-skimage-retina-tile", "phase-skimage-cell-tile"):
        records = [r for r in index if r["id"].startswith(prefix)]
        assert {r["split"] for r in records} == set(SPLITS), prefix
        for r in records:
            assert r["source"]["slice"].startswith("tile rows"), r["id"]


def test_descriptions_are_complete_sentences_from_the_record(index: list[dict], corpus: dict) -> None:
    by_image = {r["image"]: r for r in index}
    samples = [s for split in SPLITS for s in corpus[split]["complex"] if s.get("kind") == "describe"]
    assert len(samples) == len(index), "one description per image and corpus draw"
    for s in samples:
        record, answer = by_image[s["image"]], s["conversations"][1]["value"]
        assert s["conversations"][0]["value"].removeprefix("<image>\n") in corpus_mod.DESCRIBE_QUESTIONS
        assert answer.endswith(".") and not answer_is_unfinished(answer)
        assert corpus_mod.MODALITY_PHRASES[record["modality"]] in answer
        for sentence in answer.split(". "):
            assert not answer_is_unfinished(sentence), answer
        for m in record["masks"]:
            assert m["label"] in answer, (m["label"], answer)
        if record["organ"]:
            assert record["organ"] in answer
    openings = {s["conversations"][1]["value"].split(" ")[0:2][1] for s in samples}
    assert len(openings) >= 2, "the wording varies"


def test_region_grounding_targets_the_structure_under_the_region(index: list[dict], corpus: dict) -> None:
    """Issue 20: "Please segment the structure in the marked region." -> `<SEG>` with the mask of the structure the
    region holds (the region questions' rule), or words and no mask when it holds none."""
    by_image = {r["image"]: r for r in index}
    seen = set()
    for s in (s for split in SPLITS for s in corpus[split]["region_grounding"]):
        question, answer = s["conversations"][0]["value"], s["conversations"][1]["value"]
        (region_path,) = REGION_RE.findall(question)
        region = _png(region_path) > 127
        record = by_image[s["image"]]
        masks = {m["label"]: _png(m["path"]) > 127 for m in record["masks"]}
        if answer == corpus_mod.NO_STRUCTURE_ANSWER:
            assert not any((region & m).any() for m in masks.values())
            seen.add("none")
            continue
        (mask_path,) = MASK_RE.findall(answer)
        label = corpus_mod.region_label(region, masks)
        assert answer.startswith("<SEG>") and label is not None
        assert mask_path == next(m["path"] for m in record["masks"] if m["label"] == label)
        seen.add("mask")
    assert seen == {"none", "mask"}
    assert corpus_mod.REGION_SEGMENT_QUESTIONS[0].format(region="").startswith(corpus_mod.REGION_SEGMENT_QUESTION)


def test_fundus_vessel_masks_mark_the_vessels_a_viewer_sees(index: list[dict]) -> None:
    """Issue 20 (v10): the Otsu-thresholded Sato mask kept only the widest vessels, so on the test tile it marked
    2 of the vessels in view (recall 0.35 below). Checked with another detector than the one that made the masks:
    the strongest 5 % of a black top-hat (dark, thin) of the green channel inside the field of view must lie within
    2 px of the mask."""
    from scipy import ndimage as ndi

    tiles = [r for r in index if r["id"].startswith("fundus-skimage-retina-tile")]
    assert len(tiles) == 9
    for r in tiles:
        rgb = _png(r["image"])
        green = rgb[..., 1].astype(np.float64)
        fov = ndi.binary_erosion(rgb[..., 0] > 20, iterations=8)
        top_hat = ndi.grey_closing(green, size=(11, 11)) - green
        strong = (top_hat > np.percentile(top_hat[fov], 95)) & fov
        vessels = _png(next(m["path"] for m in r["masks"] if m["label"] == "retinal vessels")) > 0
        recall = (strong & ndi.binary_dilation(vessels, iterations=2)).sum() / strong.sum()
        assert recall >= 0.8, (r["id"], round(float(recall), 2))
        assert green[fov & ~vessels].mean() - green[vessels].mean() > 5, r["id"]  # the mask is darker: vessels
