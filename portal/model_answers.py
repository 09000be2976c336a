"""The model's answer to a case question: the cached one, or computed now by the portal's engine and cached.

`python -m cases precompute` fills the cache ahead of time; without it the portal computes a missing answer
the first time a student reveals the question (in the shared model queue) and stores it with the same
decoding parameters, so a later precompute run recognises it and every later reveal reads it back.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from cases import CaseRecord, CaseStore, QuestionRecord
from cases.imaging import decode_mask
from cases.records import ModelOutputRecord
from engine.results import GenerationSettings

logger = logging.getLogger(__name__)

# The defaults of `python -m cases precompute` (greedy, seed 0, 128 tokens): one cache for both paths.
CASE_ANSWER_SETTINGS = GenerationSettings(max_new_tokens=128, temperature=0.0, seed=0)


def cached_answer(store: CaseStore, question_id: int) -> ModelOutputRecord | None:
    """The newest cached model output of a question, or None."""
    outputs = store.model_outputs(question_id)
    return outputs[0] if outputs else None


def live_answer(
    store: CaseStore,
    engine: Any,
    case: CaseRecord,
    question: QuestionRecord,
    settings: GenerationSettings = CASE_ANSWER_SETTINGS,
) -> ModelOutputRecord:
    """Ask `engine` the question on the case's first image (with its region prompt), cache and return it.

    Call it inside the model queue (it runs the model). The mask, when the answer has `<SEG>`, is (H, W)
    bool at the case image's size, as the store expects.
    """
    handle = engine.set_image(case.images[0].rgb())
    region = None if question.region_png is None else decode_mask(question.region_png)
    answer = engine.ask(handle, question.prompt, region=region, settings=settings)
    logger.info("case %s question %s: model answer computed live and cached", case.id, question.id)
    return store.cache_live_output(
        question.id,
        model_id=engine.info.name,
        revision=engine.info.revision,
        parameters=dataclasses.asdict(settings),
        answer=answer.text,
        mask=answer.mask,
    )


def model_answer(
    store: CaseStore, engine: Any | None, case: CaseRecord, question: QuestionRecord
) -> ModelOutputRecord | None:
    """The cached answer; else, with an engine, a live one (then cached); else None."""
    cached = cached_answer(store, question.id)
    if cached is not None or engine is None:
        return cached
    return live_answer(store, engine, case, question)
