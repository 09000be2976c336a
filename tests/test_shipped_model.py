"""The shipped `models/medplib-tiny`: released layout, loads with no argument, and still scores on a fixed
test subset (`assets/medimages/ci_subset.json`) through `python -m engine evaluate`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.loading import DEFAULT_MODEL_DIR
from engine.tokenizer import ADDED_TOKENS

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets" / "medimages"
CI_SUBSET = ASSETS / "ci_subset.json"
MAX_CHECKPOINT_BYTES = 25 * 1024 * 1024
# Regression floors a little below what the shipped model (v11: run 21 + polishes 24, 27 and 31 of
# training/README.md) scores on the CI subset (96 samples over all seven bundled modalities): mDice 0.81 (CT 0.95,
# MRI 0.67 (its one synthetic lesion gets an empty mask), fluorescence 0.92, histopathology 0.74, nuclear medicine
# 0.89, phase 0.97; fundus 0.54: its one tile of retinal vessels is the model's known weak spot, see MODEL_CARD.md),
# closed 11/11, region 18/21, region-conditioned masks 0.81, no-structure regions 8/9, descriptions F1 0.79. The
# closed floor allows 2 of the 11 answers to be wrong, the region floor 4 of 21 (v9 had 1 wrong, v10 and v11 3).
FLOORS = {"mDice": 0.70, "closed_accuracy": 0.80, "region_accuracy": 0.80}
MODALITY_DICE_FLOORS = {"CT": 0.85, "MRI": 0.60, "fluorescence microscopy": 0.85, "histopathology": 0.65,
                        "nuclear medicine": 0.80, "phase microscopy": 0.80, "fundus photography": 0.45}
# Issue 20's tasks on the CI subset, a little below v11's figures (few samples per modality).
ISSUE_20_FLOORS = {"region_mask_mDice": 0.75, "describe_f1": 0.70, "region_none_accuracy": 0.75}

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(),
                                reason="models/medplib-tiny is not shipped in this checkout")


def test_checkpoint_is_small_and_in_the_released_layout() -> None:
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["portal_demo_model"] is True
    assert config["moe"]["moe_enable"] and config["moe"]["top_k_experts"] == 1
    assert config["moe"]["num_experts"] == [2] * config["num_hidden_layers"]
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= MAX_CHECKPOINT_BYTES, f"shipped model is {size / 2**20:.1f} MiB"
    added = json.loads((DEFAULT_MODEL_DIR / "added_tokens.json").read_text())
    assert sorted(added, key=added.get) == list(ADDED_TOKENS)
    assert (DEFAULT_MODEL_DIR / "MODEL_CARD.md").is_file()


def test_load_engine_without_argument_segments_the_brain() -> None:
    from engine import load_engine

    eng = load_engine()
    assert eng.info.is_demo_model and eng.info.n_experts == 2
    sample = next(s for s in json.loads(CI_SUBSET.read_text()) if s["task"] == "grounding"
                  and s["modality"] == "MRI")
    rgb = np.asarray(Image.open(ASSETS / sample["image"]).convert("RGB"))
    answer = eng.ask(eng.set_image(rgb), "Please segment the brain in this image.")
    assert answer.has_mask, f"no <SEG> in {answer.text!r}"
    brain = np.asarray(Image.open(ASSETS / sample["image"].replace("images/", "masks/")
                                  .replace(".png", "--brain.png")).convert("L")) > 127
    iou = (answer.mask & brain).sum() / (answer.mask | brain).sum()
    assert iou > 0.7


@pytest.fixture(scope="module")
def ci_metrics() -> dict:
    """`python -m engine evaluate --data ci_subset.json --json`, run once for the tests below."""
    out = subprocess.run([sys.executable, "-m", "engine", "evaluate", "--data", str(CI_SUBSET), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_evaluate_cli_on_the_ci_subset_meets_the_floors(ci_metrics: dict) -> None:
    metrics = ci_metrics
    assert metrics["n"]["grounding"] >= 5 and metrics["n"]["region"] >= 5 and metrics["n"]["closed"] >= 2
    for key, floor in FLOORS.items():
        assert metrics[key] >= floor, f"{key} {metrics[key]:.3f} < {floor} ({metrics})"
    for modality, floor in MODALITY_DICE_FLOORS.items():
        assert metrics["mDice_per_modality"][modality] >= floor, f"{modality}: {metrics['mDice_per_modality']}"
    assert set(metrics["expert_share"]) == {"grounding", "vqa"}


def test_the_ci_subset_scores_every_bundled_modality_and_the_new_tasks(ci_metrics: dict) -> None:
    """Issue 20: test tiles of all seven modalities, region-conditioned masks and descriptions are scored."""
    assert len(ci_metrics["mDice_per_modality"]) >= 7
    assert ci_metrics["n"]["region_mask"] >= 5 and ci_metrics["n"]["region_none"] >= 3
    assert ci_metrics["n"]["describe"] >= 7


def test_the_new_tasks_meet_their_floors(ci_metrics: dict) -> None:
    """Issue 20 on the CI subset: region-conditioned masks, no-structure regions answered in words, descriptions."""
    for key, floor in ISSUE_20_FLOORS.items():
        assert ci_metrics[key] >= floor, f"{key} {ci_metrics[key]:.3f} < {floor}"


def test_describe_the_image_is_answered_in_complete_sentences_outside_the_corpus() -> None:
    """Issue 20: v8 answered the portal's own chip "Describe the image." with an empty string or half a template;
    v9, v10 and v11 answer every one of these images (`benchmarks.describe_outside`: pydicom files and photographs
    no corpus record holds) in complete sentences (about the corpus's modalities: it knows no others)."""
    from benchmarks.describe_outside import outside_images
    from engine import load_engine
    from engine.results import answer_is_unfinished

    eng = load_engine()
    answers = [eng.ask(eng.set_image(rgb), "Describe the image.").text for rgb in outside_images().values()]
    assert not [a for a in answers if answer_is_unfinished(a)], answers


def test_the_mask_follows_the_structure_named_in_the_question() -> None:
    """Regression: an earlier model gave grey and white matter one and the same whole-brain mask (the hidden state
    that predicts `<SEG>` ignored the structure's name). On a test slice each question must get its own mask, and
    each mask must match its own structure better than the other."""
    from engine import load_engine

    eng = load_engine()
    name = "mri-mni152-axial-105"
    image = eng.set_image(np.asarray(Image.open(ASSETS / "images" / f"{name}.png").convert("RGB")))
    masks, truth = {}, {}
    for label in ("grey matter", "white matter"):
        masks[label] = eng.ask(image, f"Please segment the {label} in this image.").mask
        truth[label] = np.asarray(Image.open(ASSETS / "masks" / f"{name}--{label.replace(' ', '_')}.png")) > 127

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)

    assert dice(masks["grey matter"], masks["white matter"]) < 0.8
    for label, other in (("grey matter", "white matter"), ("white matter", "grey matter")):
        assert dice(masks[label], truth[label]) > dice(masks[label], truth[other]) + 0.2, label


FIRST_QUESTION = "What is the modality of this image?"


def _ci_samples(task: str | None = None) -> list:
    """The CI subset as `engine.evaluate` parses it (question with `<region>`, absolute region/mask paths)."""
    from engine.evaluate import load_samples

    samples = load_samples(json.loads(CI_SUBSET.read_text()), ASSETS)
    return [s for s in samples if (task is None or s.task == task)]


def _read_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 127


def _ask_as_follow_up(eng, sample):
    """The engine's answer to an `EvalSample`'s question (its region mask as the region prompt) asked after the turn
    FIRST_QUESTION about the same image, with the model's own answer to that turn, as the portal's chat sends it."""
    image = eng.set_image(np.asarray(Image.open(sample.image).convert("RGB")))
    first = eng.ask(image, FIRST_QUESTION)
    return eng.ask(image, sample.question, region=_read_mask(sample.region) if sample.region else None,
                   history=[(FIRST_QUESTION, first.text)])


def test_a_follow_up_grounding_question_keeps_its_mask() -> None:
    """The portal keeps the conversation: a segmentation asked after another turn about the same image must still
    get its mask. Run 16 of `training/README.md`, trained on first questions only, met every single-turn target yet
    fell from CI-subset mDice 0.78 to 0.53 after one earlier turn (three masks empty); v8, trained with follow-ups,
    scored 0.75 either way, v9 0.76 / 0.73. Floor: 0.68 over the CI subset's grounding samples."""
    from engine import load_engine
    from engine.evaluate import dice_from_iou, mask_iou

    eng = load_engine()
    dices = [dice_from_iou(mask_iou(_ask_as_follow_up(eng, sample).mask, _read_mask(sample.gt_mask)))
             for sample in _ci_samples("grounding")]
    assert np.mean(dices) >= 0.68, np.round(dices, 3)


def test_follow_up_questions_are_answered_as_first_questions_are() -> None:
    """The yes/no and region questions of the CI subset, each asked after the turn "What is the modality of this
    image?", meet the single-turn floors. Asked that way, v7 (trained on first questions only) answered val yes/no
    questions at 0.50 (0.955 as first questions), run 16 none of 44, and run 19 (no yes/no follow-ups in training)
    0.18; v9 answers 9/11 and 21/21 of the CI subset that way (10/11 and 20/21 as first questions)."""
    from engine import load_engine
    from engine.evaluate import normalize_answer

    eng = load_engine()
    right: dict[str, list[bool]] = {"closed": [], "region": []}
    for sample in _ci_samples():
        kind = "region" if sample.task == "region" else "closed" if sample.answer_type == "closed" else None
        if kind is None:
            continue
        answer = _ask_as_follow_up(eng, sample)
        right[kind].append(normalize_answer(answer.text) == normalize_answer(sample.reference))
    assert np.mean(right["closed"]) >= FLOORS["closed_accuracy"], right["closed"]
    assert np.mean(right["region"]) >= FLOORS["region_accuracy"], right["region"]
