"""The early read-out check of training (`teacher_forced_accuracy`) says exactly what greedy decoding answers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from engine.loading import DEFAULT_MODEL_DIR

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "medimages"

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(),
                                reason="models/medplib-tiny is not shipped in this checkout")


def test_teacher_forced_exact_match_is_the_greedy_answer() -> None:
    """On the shipped model (its own router deciding), an answer counts as right under teacher forcing exactly
    when `Engine.ask` answers it word for word; references made wrong on purpose count as wrong in both."""
    from engine import load_engine
    from engine.evaluate import normalize_answer
    from training.corpus import build_corpus
    from training.train import load_examples, teacher_forced_accuracy

    eng = load_engine()
    val = build_corpus(ASSETS)["val"]
    examples = load_examples(val["region"][:8] + [s for s in val["complex"] if s["answer_type"] == "closed"][:4],
                             ASSETS)
    flipped = [replace(e, answer={"yes": "no", "no": "yes"}.get(e.answer, "yes"))
               for e in examples[:6]]
    outcomes = []
    for ex in examples + flipped:
        tf_right = teacher_forced_accuracy(eng.model, eng.tokenizer, [ex]) == 1.0
        greedy = eng.ask(eng.set_image(ex.image), ex.question, region=ex.region).text
        assert tf_right == (normalize_answer(greedy) == normalize_answer(ex.answer)), (ex.question, greedy, ex.answer)
        outcomes.append(tf_right)
    assert any(outcomes) and not all(outcomes)
