"""Conversation templates and prompt building (MedPLIB's vicuna_v1 / llava_v1, separator style TWO).

Prompt layout (reference/medplib.md §4.3):
    "{system} USER: <im_start><image><im_end>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:"
The image goes in the first human turn, as LLaVA's `preprocess_multimodal` puts it; the last
`ASSISTANT:` is left open for generation. Region rule from MedPLIB's demo (`format_region_prompt`): the
question carries exactly one `<region></region>` when the user drew a region.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from engine.tokenizer import (
    ADDED_TOKENS,
    BOS_TOKEN,
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMAGE_TOKEN,
    REGION_END_TOKEN,
    REGION_START_TOKEN,
    UNK_TOKEN,
)

REGION_TAGS = REGION_START_TOKEN + REGION_END_TOKEN  # "<region></region>", where the region feature goes
IMAGE_PROMPT_PREFIX = IM_START_TOKEN + IMAGE_TOKEN + IM_END_TOKEN + "\n"
# Control tokens a user may not type: they would inject EOS, image brackets or `<SEG>` into the prompt.
FORBIDDEN_IN_QUESTION: tuple[str, ...] = tuple(
    t
    for t in (*ADDED_TOKENS, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
    if t not in (REGION_START_TOKEN, REGION_END_TOKEN)
)

# Tokens that would break the turn structure if an earlier answer carried them.
STRUCTURE_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, IMAGE_TOKEN)


@dataclass(frozen=True)
class ConversationTemplate:
    """A LLaVA separator-style-TWO template: turns end with `sep` (human) or `sep2` (assistant)."""

    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"

    def __post_init__(self) -> None:
        if not self.system or len(self.roles) != 2:
            raise ValueError(f"template {self.name!r} needs a system prompt and exactly two roles")


VICUNA_V1 = ConversationTemplate(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
)
LLAVA_V1 = ConversationTemplate(
    name="llava_v1",
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
)
TEMPLATES: dict[str, ConversationTemplate] = {t.name: t for t in (VICUNA_V1, LLAVA_V1)}
EVAL_TEMPLATE = "vicuna_v1"  # what MedPLIB's evaluation scripts use (`conv_templates['v1']`)
TRAIN_TEMPLATE = "llava_v1"  # what training and the released demo use
DEFAULT_TEMPLATE = TRAIN_TEMPLATE  # the CLI, the portal, `engine evaluate` and the quiz (GenerationSettings)
# Region-conditioned grounding (training.corpus): the portal's Segment button asks exactly this, with the region,
# when the question box is empty; the shipped model answers `<SEG>` with the mask of the labelled structure under
# the region, or says in words that the region holds none.
REGION_SEGMENT_QUESTION = "Please segment the structure in the marked region."


def get_template(template: str | ConversationTemplate) -> ConversationTemplate:
    """Look a template up by name ("vicuna_v1" or "llava_v1")."""
    if isinstance(template, ConversationTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def _check_control_tokens(text: str, what: str) -> None:
    found = [t for t in FORBIDDEN_IN_QUESTION if t in text]
    if found:
        raise ValueError(
            f"the {what} contains the control token(s) {found}; remove them (only "
            f"{IMAGE_TOKEN} and {REGION_START_TOKEN} may be typed)"
        )


def _check_answer(answer: str) -> None:
    """Earlier answers may hold `<SEG>` etc., but not tokens that break the turn structure."""
    found = [t for t in STRUCTURE_TOKENS if t in answer]
    if found:
        raise ValueError(f"an earlier answer contains {found}; pass the user-facing answer text")


def _squash_spaces(text: str) -> str:
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def _current_question(question: str, has_region: bool) -> str:
    """Apply the region rule to the question being asked now (see module docstring)."""
    text = question.replace(REGION_TAGS, REGION_START_TOKEN)
    if REGION_END_TOKEN in text:
        raise ValueError(
            f"the question has a stray {REGION_END_TOKEN}; write {REGION_START_TOKEN} where the "
            "region belongs, or nothing"
        )
    n_regions = text.count(REGION_START_TOKEN)
    if n_regions > 1:
        raise ValueError(f"the question names {n_regions} regions; MedPLIB takes one region per question")
    if n_regions == 1 and not has_region:
        raise ValueError(
            f"the question mentions {REGION_START_TOKEN} but no region was given; draw a "
            f"point, box or sketch, or remove {REGION_START_TOKEN}"
        )
    if n_regions == 1:
        return text.replace(REGION_START_TOKEN, REGION_TAGS)
    return text + REGION_TAGS if has_region else text


def _history_question(question: str) -> str:
    """Earlier turns are text only: their region tags are removed (no region feature is replayed)."""
    text = question.replace(REGION_START_TOKEN, " ").replace(REGION_END_TOKEN, " ")
    return _squash_spaces(text)


def _with_image(question: str) -> str:
    """First human turn: `<image>` moved to the front and wrapped, as LLaVA's preprocess_multimodal does."""
    return IMAGE_PROMPT_PREFIX + question.replace(IMAGE_TOKEN, "").strip()


def _human_turns(question: str, history: Sequence[tuple[str, str]], has_region: bool) -> list[str]:
    questions = [_history_question(q) for q, _ in history] + [_current_question(question, has_region)]
    questions = [q.replace(IMAGE_TOKEN, "").strip() for q in questions]
    if not questions[-1].replace(REGION_TAGS, "").strip():
        raise ValueError("the question is empty; type a question about the image")
    questions[0] = _with_image(questions[0])
    return questions


def build_prompt(
    question: str,
    *,
    template: str | ConversationTemplate,
    history: Sequence[tuple[str, str]] = (),
    has_region: bool = False,
) -> str:
    """The prompt text for one question about one image, ending with an open "ASSISTANT:".

    question: the user's text; `<image>` anywhere is moved to the front, `<region>` marks where the
    region feature goes (at most one). history: earlier (question, answer_text) pairs on the same image.
    has_region: whether a region mask accompanies this question (then `<region></region>` is placed at
    `<region>`, or right before " ASSISTANT:" when the question has no `<region>`).
    Tokenise with `MedPLIBTokenizer.encode_prompt`.
    """
    conv = get_template(template)
    for q, a in history:
        _check_control_tokens(q, "earlier question")
        _check_answer(a)
    _check_control_tokens(question, "question")
    humans = _human_turns(question, history, has_region)
    user, assistant = conv.roles
    text = conv.system + conv.sep
    for q, (_, a) in zip(humans, history, strict=False):
        text += f"{user}: {q}{conv.sep}{assistant}: {a.strip()}{conv.sep2}"
    return text + f"{user}: {humans[-1]}{conv.sep}{assistant}:"


def build_conversation(
    question: str,
    answer: str,
    *,
    template: str | ConversationTemplate,
    history: Sequence[tuple[str, str]] = (),
    has_region: bool = False,
) -> str:
    """The prompt followed by " {answer}</s>", as the training dataset renders a finished turn.

    The answer may hold control tokens such as `<SEG>` (used to teacher-force a mask).
    """
    conv = get_template(template)
    prompt = build_prompt(question, template=conv, history=history, has_region=has_region)
    return f"{prompt} {answer.strip()}{conv.sep2}"
