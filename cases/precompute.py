"""Cache model answers for every case question, so quiz and library work without a GPU.

This is the only module of `cases` that touches the engine; it imports it inside the function.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from cases.imaging import decode_mask
from cases.records import CaseRecord, QuestionRecord

log = logging.getLogger(__name__)


def precompute_outputs(
    store: Any,
    *,
    model: str | None = None,
    device: str | None = None,
    max_new_tokens: int = 128,
    cases: Sequence[int | str] = (),
    force: bool = False,
    engine: Any = None,
) -> int:
    """Ask the model every question of the chosen cases (default: all) and store the answers.

    Greedy decoding (temperature 0, seed 0). Questions that already have an output of the same model,
    revision and parameters are skipped unless `force`. `engine` lets a caller pass a loaded engine.
    Returns the number of outputs stored.
    """
    from engine.results import GenerationSettings  # light: no torch

    if engine is None:
        from engine import load_engine  # imports torch

        engine = load_engine(model, device=device)
    eng = engine
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    parameters = dataclasses.asdict(settings)
    session = store.operator_session()
    ids = list(cases) or [c.id for c in store.list_cases(include_unpublished=True)]
    stored = 0
    for case_id in tqdm(ids, desc="precompute", unit="case"):
        case = store.get_case(case_id, session)
        todo = [q for q in case.questions if force or not _cached(store, q, eng.info, parameters)]
        if not todo:
            continue
        handle = eng.set_image(case.images[0].rgb())
        for question in todo:
            answer = eng.ask(handle, question.prompt, region=_region(question), settings=settings)
            store.save_model_output(
                session, question.id, model_id=eng.info.name, revision=eng.info.revision,
                parameters=parameters, answer=answer.text, mask=answer.mask,
            )  # fmt: skip
            stored += 1
        log.info("case %s: %d answers cached", _label(case), len(todo))
    return stored


def _cached(store: Any, question: QuestionRecord, info: Any, parameters: dict[str, Any]) -> bool:
    return any(
        o.model_id == info.name and o.revision == info.revision and dict(o.parameters) == parameters
        for o in store.model_outputs(question.id)
    )


def _region(question: QuestionRecord) -> Any:
    return None if question.region_png is None else decode_mask(question.region_png)


def _label(case: CaseRecord) -> str:
    return f"{case.id} ({case.summary.slug})"
