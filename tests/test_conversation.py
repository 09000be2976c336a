"""Prompt building: golden prompts of the reference evaluation, templates, history and the region rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.conversation import LLAVA_V1, VICUNA_V1, build_conversation, build_prompt, get_template
from engine.tokenizer import REGION_TOKEN_INDEX, MedPLIBTokenizer

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
needs_golden = pytest.mark.skipif(not (GOLDEN / "tiny-medplib-ref").is_dir(), reason="golden fixtures absent")


def _sample(name: str) -> tuple[str, str]:
    conv = json.loads((GOLDEN / "inputs" / f"{name}.json").read_text(encoding="utf-8"))[0]["conversations"]
    answer = conv[1]["value"].replace("<mask>a_liver_mask.png</mask>", "")  # the dataset strips mask paths
    return conv[0]["value"], answer


@needs_golden
@pytest.mark.parametrize("name", ["a_grounding", "c_vqa"])
def test_golden_prompt_ids(name: str) -> None:
    """The vicuna_v1 prompt of the reference evaluation tokenises to the golden input_ids exactly."""
    tok = MedPLIBTokenizer.from_folder(GOLDEN / "tiny-medplib-ref")
    arrays = np.load(GOLDEN / f"{name}.npz")
    question, answer = _sample(name)
    prompt = build_prompt(question, template="vicuna_v1")
    assert tok.encode_prompt(prompt) == arrays["input_ids"][0].tolist()
    full = build_conversation(question, answer, template="vicuna_v1")
    assert full == json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))["conversation"]
    assert tok.encode_prompt(full) == arrays["full_conversation_input_ids"][0].tolist()


def test_templates_differ_only_in_user_words() -> None:
    assert "curious user" in VICUNA_V1.system and "user's questions" in VICUNA_V1.system
    assert "curious human" in LLAVA_V1.system and "human's questions" in LLAVA_V1.system
    assert get_template("llava_v1") is LLAVA_V1
    with pytest.raises(ValueError, match="vicuna_v1"):
        get_template("v2")


def test_image_moves_to_front_and_prompt_is_open() -> None:
    prompt = build_prompt("Is this <image> a CT?  ", template="llava_v1")
    assert prompt == LLAVA_V1.system + " USER: <im_start><image><im_end>\nIs this  a CT? ASSISTANT:"
    assert prompt.count("<image>") == 1


def test_history_turns_render_with_eos_and_no_regions() -> None:
    prompt = build_prompt(
        "And the spleen?",
        template="vicuna_v1",
        history=[("Segment the <region> liver", "Here it is. "), ("Size?", "Large")],
    )
    expected = (
        VICUNA_V1.system + " USER: <im_start><image><im_end>\nSegment the liver ASSISTANT: Here it is.</s>"
        "USER: Size? ASSISTANT: Large</s>USER: And the spleen? ASSISTANT:"
    )
    assert prompt == expected


@pytest.mark.parametrize(
    ("question", "expected_question"),
    [
        ("What is in <region>?", "What is in <region></region>?"),
        ("What is in <region></region>?", "What is in <region></region>?"),
        ("What is this?", "What is this?<region></region>"),
    ],
)
def test_region_rule(question: str, expected_question: str) -> None:
    prompt = build_prompt(question, template="llava_v1", has_region=True)
    assert prompt.endswith(f"\n{expected_question} ASSISTANT:")


def test_region_prompt_tokenises_with_placeholder() -> None:
    if not (GOLDEN / "tiny-medplib-ref").is_dir():
        pytest.skip("golden fixtures absent")
    tok = MedPLIBTokenizer.from_folder(GOLDEN / "tiny-medplib-ref")
    ids = tok.encode_prompt(build_prompt("What is this?", template="llava_v1", has_region=True))
    i = ids.index(REGION_TOKEN_INDEX)
    assistant = tok.encode("ASSISTANT:", add_bos=False)
    assert ids[i - 1 : i + 2] == [tok.token_id("<region>"), REGION_TOKEN_INDEX, tok.token_id("</region>")]
    assert ids[i + 2 :] == assistant  # "<region></region>" sits right before " ASSISTANT:"


@pytest.mark.parametrize(
    ("question", "has_region", "message"),
    [
        ("<region> and <region>", True, "one region"),
        ("What is <region>?", False, "no region was given"),
        ("stray </region>", True, "stray"),
        ("   ", False, "empty"),
        ("end early </s>", False, "control token"),
        ("<SEG> please", False, "control token"),
    ],
)
def test_bad_questions_fail_loudly(question: str, has_region: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_prompt(question, template="llava_v1", has_region=has_region)
