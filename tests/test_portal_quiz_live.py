"""Quiz reveals with no precomputed model output: the portal's engine (shipped small model) answers live.

Real inference with models/medplib-tiny on a starter case built from a bundled MNI152 brain slice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from portal_helpers import portal_context

from cases import CaseNotFound, CaseStore
from cases.precompute import precompute_outputs
from cases.samples import sample_draft
from portal import texts
from portal.model_answers import CASE_ANSWER_SETTINGS
from portal.quiz_tab import LAYERS, MODEL_PENDING, NO_MODEL_OUTPUT, QuizHandlers, QuizState

BRAIN_CASE = "starter-mri-mni152-axial-069-brain"  # "Please segment the brain in this image."


@pytest.fixture(scope="module")
def engine():
    from engine import load_engine

    return load_engine(device="cpu")  # the shipped models/medplib-tiny


@pytest.fixture
def store(tmp_path: Path) -> CaseStore:
    return CaseStore(str(tmp_path / "quiz-live.sqlite"))  # with the starter library


def _layer(mask: np.ndarray) -> np.ndarray:
    layer = np.zeros((*mask.shape, 4), np.uint8)
    layer[mask] = (230, 159, 0, 255)
    return layer


def _submit_brain_drawing(h: QuizHandlers, store: CaseStore, student: str) -> tuple:
    """Start the brain case, pick its segmentation question, draw the reference brain, submit."""
    case = store.get_case(BRAIN_CASE)
    seg = next(q for q in case.questions if q.kind == "segmentation")
    state = h.choose_question(seg.id, h.start(case.id, QuizState())[0])[0]
    drawing = {"layers": [_layer(case.images[0].mask("brain").array())]}
    return h.submit(None, "", drawing, student, "", state), seg


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_reveal_computes_the_missing_model_answer_and_caches_it(store: CaseStore, engine) -> None:
    h = QuizHandlers(store, engine)
    out, seg = _submit_brain_drawing(h, store, "student-a")
    state, result, before = out[0], out[2], out[3]
    assert MODEL_PENDING in result and "Dice **1.000**" in result  # the student's score is not held up
    assert store.model_outputs(seg.id) == ()

    result, compare = h.reveal_model(list(LAYERS), state)
    assert "**Model answer** (medplib-tiny)" in result and MODEL_PENDING not in result
    assert "Dice **1.000**" in result  # the reveal text keeps the student's score
    [output] = store.model_outputs(seg.id)
    assert output.model_id == engine.info.name
    assert dict(output.parameters) == dataclasses.asdict(CASE_ANSWER_SETTINGS)
    reference = store.get_case(BRAIN_CASE).images[0].mask("brain").array()
    assert _dice(output.mask(), reference) > 0.7  # the shipped model knows the brain on MNI152 slices
    assert not np.array_equal(compare, before)  # the model layer (sky blue) now appears
    assert np.array_equal(h.toggle(["model"], state), compare) is False  # toggles still work
    assert not np.array_equal(h.toggle(["model"], state), h.toggle([], state))

    # the next student reads the cached answer at once; nothing is computed again
    out2, _ = _submit_brain_drawing(h, store, "student-b")
    assert "**Model answer** (medplib-tiny)" in out2[2] and MODEL_PENDING not in out2[2]
    assert h.reveal_model(list(LAYERS), out2[0]) == (gr.skip(), gr.skip())
    assert len(store.model_outputs(seg.id)) == 1

    # `python -m cases precompute` recognises the live answer as its own
    case = store.get_case(BRAIN_CASE)
    stored = precompute_outputs(store, engine=engine, cases=[case.id])
    assert stored == len(case.questions) - 1 and len(store.model_outputs(seg.id)) == 1


@pytest.mark.parametrize("kind", ["closed", "open"])
def test_text_questions_get_a_live_answer_that_is_never_blank(store: CaseStore, engine, kind: str) -> None:
    h = QuizHandlers(store, engine)
    case = store.get_case(BRAIN_CASE)
    question = next(q for q in case.questions if q.kind == kind)
    state = h.choose_question(question.id, h.start(case.id, QuizState())[0])[0]
    state = h.submit(question.choices[0] if kind == "closed" else "", "white matter", None, "", "", state)[0]
    result, _compare = h.reveal_model([], state)
    [output] = store.model_outputs(question.id)
    line = result.split("**Model answer** (medplib-tiny): ")[1]
    # the tiny model sometimes answers a text question with just <SEG>: the reveal says so, never ""
    expected = output.answer if output.answer.strip() else "(a mask only: see the model layer)"
    assert line.startswith(expected) and line.strip()


def test_without_an_engine_the_quiz_points_to_precompute(store: CaseStore) -> None:
    h = QuizHandlers(store)
    out, seg = _submit_brain_drawing(h, store, "student-c")
    assert NO_MODEL_OUTPUT in out[2]
    assert h.reveal_model(list(LAYERS), out[0]) == (gr.skip(), gr.skip())
    assert store.model_outputs(seg.id) == ()


def test_a_failing_model_keeps_the_reveal_and_caches_nothing(store: CaseStore, engine) -> None:
    class Broken:
        info = engine.info

        def set_image(self, rgb: np.ndarray) -> None:
            raise RuntimeError("out of memory")

    h = QuizHandlers(store, Broken())
    out, seg = _submit_brain_drawing(h, store, "student-d")
    result, compare = h.reveal_model(list(LAYERS), out[0])
    assert "could not answer this question (RuntimeError)" in result and "Dice **1.000**" in result
    assert compare == gr.skip() and store.model_outputs(seg.id) == ()


def test_live_outputs_only_for_published_cases(store: CaseStore) -> None:
    hidden = store.create_case(store.operator_session(), sample_draft("Hidden", published=False))
    with pytest.raises(CaseNotFound, match="no published question"):
        store.cache_live_output(
            hidden.questions[0].id, model_id="m", revision=None, parameters={}, answer="x", mask=None
        )


def test_live_answers_run_in_the_shared_model_queue(store: CaseStore, engine) -> None:
    from portal.app import build_app
    from portal.context import PortalContext

    ctx = PortalContext(engine=engine, store=store, settings=portal_context(engine).settings)
    demo = build_app(ctx)
    live = [fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "reveal_model"]
    assert len(live) == 1
    assert (live[0].concurrency_id, live[0].concurrency_limit) == (texts.MODEL_CONCURRENCY_ID, 1)
