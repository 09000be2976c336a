"""MeCoVQA metrics of `engine.evaluate` against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from engine.evaluate import (
    EvalSample,
    SampleResult,
    bleu1,
    dice_from_iou,
    mask_iou,
    normalize_answer,
    parse_sample,
    summarize,
    token_f1,
    token_recall,
)


def test_iou_and_dice_of_overlapping_squares() -> None:
    pred = np.zeros((10, 10), dtype=bool)
    gt = np.zeros((10, 10), dtype=bool)
    pred[0:4, 0:4] = True  # 16 px
    gt[2:6, 2:6] = True  # 16 px, overlap 2x2 = 4, union 28
    assert mask_iou(pred, gt) == pytest.approx(4 / 28)
    assert dice_from_iou(4 / 28) == pytest.approx(2 * 4 / (16 + 16))  # Dice = 2|A∩B| / (|A|+|B|)


def test_missing_mask_and_empty_union_score_zero() -> None:
    gt = np.zeros((4, 4), dtype=bool)
    assert mask_iou(None, gt) == 0.0
    assert mask_iou(np.zeros((4, 4), dtype=bool), gt) == 0.0
    gt[0, 0] = True
    assert mask_iou(gt.copy(), gt) == 1.0


def test_mask_size_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        mask_iou(np.zeros((3, 3), dtype=bool), np.zeros((4, 4), dtype=bool))


def test_normalisation_drops_case_and_punctuation() -> None:
    assert normalize_answer("  Yes. ") == "yes"
    assert normalize_answer("The region shows background; none of the brain, grey matter") == \
        "the region shows background none of the brain grey matter"


def test_recall_f1_bleu1_hand_computed() -> None:
    ref = "This is a MRI image."  # 5 words
    pred = "This is an MRI scan image image"  # 7 words; matches: this, is, mri, image (x1 clipped)
    assert token_recall(pred, ref) == pytest.approx(4 / 5)
    precision, recall = 4 / 7, 4 / 5
    assert token_f1(pred, ref) == pytest.approx(2 * precision * recall / (precision + recall))
    assert bleu1(pred, ref) == pytest.approx(4 / 7)  # longer than the reference: no brevity penalty


def test_bleu1_brevity_penalty_and_empty_prediction() -> None:
    ref = "the image shows the brain"  # 5 words
    assert bleu1("the brain", ref) == pytest.approx(math.exp(1 - 5 / 2) * 1.0)
    assert bleu1("", ref) == 0.0
    assert token_f1("", ref) == 0.0
    assert token_recall("brain brain", "brain") == 1.0


def test_parse_sample_strips_paths_and_tags(tmp_path: Path) -> None:
    raw = {"id": "g1", "image": "images/a.png", "task": "region", "answer_type": "open", "modality": "MRI",
           "conversations": [{"from": "human", "value": "<image>\nWhat is in <region>regions/r.png</region>?"},
                             {"from": "gpt", "value": "The region shows the brain."}]}
    sample = parse_sample(raw, tmp_path)
    assert sample.question == "What is in <region>?"
    assert sample.region == tmp_path / "regions/r.png"
    grounding = parse_sample({**raw, "task": None, "conversations": [
        {"from": "human", "value": "<image>\nSegment the brain."},
        {"from": "gpt", "value": "<SEG><mask>masks/m.png</mask>"}]}, tmp_path)
    assert grounding.task == "grounding" and grounding.gt_mask == tmp_path / "masks/m.png"
    assert grounding.reference == ""


def _result(task: str, answer_type: str, prediction: str, reference: str, iou: float | None = None,
            modality: str = "MRI", gt_mask: Path | None = None) -> SampleResult:
    sample = EvalSample(id="x", task=task, answer_type=answer_type, modality=modality, image=Path("i.png"),
                        question="q", reference=reference, region=None, gt_mask=gt_mask)
    return SampleResult(sample=sample, prediction=prediction, iou=iou)


def test_summary_splits_subsets_and_modalities() -> None:
    results = [
        _result("grounding", "open", "", "", iou=0.5),
        _result("grounding", "open", "", "", iou=1.0),
        _result("grounding", "open", "", "", iou=0.0, modality="CT"),
        _result("complex", "closed", "Yes", "yes"),
        _result("complex", "closed", "no", "yes"),
        _result("complex", "open", "This is a MRI image.", "This is a MRI image."),
        _result("region", "open", "The region shows the brain.", "The region shows the brain"),
        _result("region", "closed", "yes", "no"),
    ]
    m = summarize(results)
    assert m["mIoU"] == pytest.approx(0.5)
    assert m["mDice"] == pytest.approx(round((2 * 0.5 / 1.5 + 1.0 + 0.0) / 3, 4))
    assert m["mDice_per_modality"] == {"CT": 0.0, "MRI": pytest.approx(round((2 / 3 + 1) / 2, 4))}
    assert m["closed_accuracy"] == 0.5 and m["region_accuracy"] == 0.5
    assert m["open_recall"] == m["open_f1"] == m["bleu1"] == 1.0
    assert m["n"] == {"grounding": 3, "closed": 2, "open": 1, "region": 2, "region_mask": 0, "region_none": 0,
                      "describe": 0, "total": 8, "refused": 0}
    assert m["region_accuracy_per_modality"] == {"MRI": 0.5} and m["closed_accuracy_per_modality"] == {"MRI": 0.5}
    assert m["n_per_modality"]["CT"] == {"grounding": 1}


def test_summary_scores_region_conditioned_masks_and_descriptions_apart() -> None:
    """Issue 20: `region_mask_mDice` (region-conditioned grounding with a reference mask), `region_none_accuracy`
    (its regions over no structure: right without `<SEG>`) and `describe_f1`, overall and per modality; neither
    task changes the grounding or open-question figures."""
    def region_ground(iou: float | None, has_mask: bool, modality: str = "MRI") -> SampleResult:
        sample = EvalSample(id="r", task="region_grounding", answer_type="open", modality=modality,
                            image=Path("i.png"), question="q <region>", reference="", region=Path("r.png"),
                            gt_mask=None if iou is None else Path("m/a--brain.png"))
        return SampleResult(sample=sample, prediction="", iou=iou, has_mask=has_mask)

    def describe(prediction: str, reference: str, modality: str) -> SampleResult:
        sample = EvalSample(id="d", task="complex", answer_type="open", modality=modality, image=Path("i.png"),
                            question="Describe the image.", reference=reference, region=None, gt_mask=None,
                            kind="describe")
        return SampleResult(sample=sample, prediction=prediction, iou=None)

    results = [
        _result("grounding", "open", "", "", iou=1.0),
        region_ground(0.5, True), region_ground(0.0, True, "CT"), region_ground(None, False),
        region_ground(None, True, "CT"),
        describe("This is a CT image of the head.", "This is a CT image of the head.", "CT"),
        describe("", "This is an MRI image.", "MRI"),
        _result("complex", "open", "The modality is CT.", "The modality is CT."),
    ]
    m = summarize(results)
    assert m["mDice"] == 1.0 and m["n"]["grounding"] == 1 and m["open_f1"] == 1.0 and m["n"]["open"] == 1
    assert m["region_mask_mDice"] == pytest.approx(round((2 * 0.5 / 1.5 + 0.0) / 2, 4))
    assert m["region_mask_mDice_per_modality"] == {"CT": 0.0, "MRI": pytest.approx(round(2 / 3, 4))}
    assert m["region_none_accuracy"] == 0.5 and m["region_none_accuracy_per_modality"] == {"CT": 0.0, "MRI": 1.0}
    assert m["describe_f1"] == 0.5 and m["describe_f1_per_modality"] == {"CT": 1.0, "MRI": 0.0}
    assert (m["n"]["region_mask"], m["n"]["region_none"], m["n"]["describe"]) == (2, 2, 2)
    assert m["n_per_modality"]["MRI"] == {"complex": 1, "describe": 1, "grounding": 1, "region_grounding": 2}


def test_mask_class_reads_mecovqa_and_corpus_mask_names() -> None:
    from engine.evaluate import mask_class

    assert mask_class(Path("masks_merged/PMC1234_fig2--left_kidney_merged.png")) == "left kidney"
    assert mask_class(Path("masks/mri-mni152-axial-105--grey_matter.png")) == "grey matter"
    assert mask_class(Path("masks/plain.png")) is None and mask_class(None) is None


def test_summary_reports_dice_per_class_within_a_modality() -> None:
    results = [
        _result("grounding", "open", "", "", iou=1.0, gt_mask=Path("m/a--brain.png")),
        _result("grounding", "open", "", "", iou=0.5, gt_mask=Path("m/a--grey_matter.png")),
        _result("grounding", "open", "", "", iou=0.0, gt_mask=Path("m/b--grey_matter.png")),
        _result("grounding", "open", "", "", iou=1.0, modality="CT"),  # no class in the name: not listed
    ]
    m = summarize(results)
    assert m["mDice_per_class"] == {"MRI: brain": 1.0, "MRI: grey matter": pytest.approx(round(2 / 3 / 2, 4))}
    assert m["n_per_class"] == {"MRI: brain": 1, "MRI: grey matter": 2}


REQUIRED_KEYS = {"mDice", "mIoU", "mDice_per_modality", "closed_accuracy", "region_accuracy", "open_recall",
                 "open_f1", "bleu1", "n", "expert_share"}


def test_evaluate_cli_json_contract_with_any_model(tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    """A random tiny checkpoint still yields the full JSON record (its scores are meaningless)."""
    from engine.cli import main

    subset = Path(__file__).resolve().parents[1] / "assets" / "medimages" / "ci_subset.json"
    code = main(["evaluate", "--model", str(tiny_checkpoint), "--data", str(subset), "--limit", "6",
                 "--max-new-tokens", "3", "--json"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) >= REQUIRED_KEYS
    assert metrics["n"]["total"] == 6
    for kind in metrics["expert_share"].values():
        for layer in kind["all"]:
            assert sum(layer) == pytest.approx(1.0, abs=1e-3)


def test_evaluate_cli_missing_data_is_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from engine.cli import main

    assert main(["evaluate", "--data", str(tmp_path / "nope.json"), "--json"]) == 2
    assert "data file not found" in capsys.readouterr().err


def test_after_turn_asks_every_question_as_a_follow_up(tiny_checkpoint: Path) -> None:
    """`--after-turn Q`: each scored question is asked after Q about the same image with the model's own answer to
    it (once per image); that earlier turn is neither scored nor tallied."""
    from engine.evaluate import evaluate_engine
    from engine.loading import load_engine
    from engine.results import GenerationSettings

    assets = Path(__file__).resolve().parents[1] / "assets" / "medimages"
    raw = json.loads((assets / "ci_subset.json").read_text())[:5]
    eng = load_engine(tiny_checkpoint)
    calls: list[tuple[str, tuple]] = []
    real_ask = eng.ask

    def ask(image, question, **kwargs):
        answer = real_ask(image, question, **kwargs)
        calls.append((question, tuple(kwargs.get("history", ())), answer.text))
        return answer

    eng.ask = ask
    first = "What is the modality of this image?"
    metrics = evaluate_engine(eng, raw, assets, settings=GenerationSettings(max_new_tokens=3), after_turn=first)
    assert metrics["n"]["total"] == 5 and metrics["after_turn"] == first
    earlier = [c for c in calls if c[0] == first and not c[1]]
    scored = [c for c in calls if c[1]]
    assert len(earlier) == len({r["image"] for r in raw}) and len(scored) == 5
    answers = {c[2] for c in earlier}
    assert all(c[1][0][0] == first and c[1][0][1] in answers for c in scored)
