"""Quiz tab: an unknown case, predict-then-reveal answers, a drawn mask scored with Dice and IoU.

The student answers (closed: pick; open: type) and/or draws the structure on the editor's "mask" layer
(mask = brush alpha > 0). On submit the attempt is scored and stored by `CaseStore.record_attempt`,
then the student / model / reference masks are revealed in three Okabe-Ito colours with toggles, with
the reference answer, the model's answer and the case discussion. The model's answer is the cached one
(`python -m cases precompute`); when there is none and the portal has an engine, a second event in the
shared model queue computes it, caches it in the store and updates the reveal (portal/model_answers.py).
A plotly chart tracks the session's progress. Students are an anonymous browser id or a course pseudonym.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

import gradio as gr
import numpy as np
import plotly.graph_objects as go
from PIL import Image as PILImage

from cases import CaseNotFound, CaseRecord, CaseStore, CaseStoreError, QuestionRecord
from cases.marking import CORRECT, PARTLY, WRONG, protected_terms, redact
from portal import texts
from portal.library_tab import NO_STORE, case_markdown
from portal.model_answers import cached_answer, live_answer
from portal.overlay import overlay_mask
from portal.refusals import UserMistake, refusing
from portal.safe_text import plain

logger = logging.getLogger(__name__)

RANDOM_CASE = 0
LAYER_COLORS = {  # Okabe-Ito: distinguishable with the common colour-vision deficiencies
    "student": texts.MASK_COLORS["orange"],
    "model": texts.MASK_COLORS["sky blue"],
    "reference": texts.MASK_COLORS["bluish green"],
}
LAYERS = tuple(LAYER_COLORS)
BRUSH_COLOR = "#E69F00"  # the student's colour, also while drawing
NO_MODEL_OUTPUT = "No cached model answer for this question yet (`python -m cases precompute`)."
MODEL_PENDING = "**Model answer:** *the model is answering this question now…*"
MODEL_FAILED = "**Model answer:** the model could not answer this question ({kind}); the rest is unaffected."
N_VIEW = 8  # prompt, closed, opened, editor, result, compare, layers, discussion (see build_quiz_tab)
SESSION_ATTEMPTS_PER_MINUTE = 6  # submits per browser session per minute (the store also limits per student)
MAX_ANSWER_CHARS = 1000  # the open answer box (the store refuses longer answers too)
TOO_FAST = "That was quick: wait a moment before submitting again (at most {n} answers a minute)."
PSEUDONYM_HELP = (
    "Course pseudonym (optional; never your real name). Empty = an anonymous id kept by this browser."
)


@dataclass(frozen=True)
class QuizState:
    """One browser's quiz session. `drawn` is the submitted (H, W) bool mask, kept for the toggles."""

    case_id: int | None = None
    question_id: int | None = None
    started: float = 0.0
    submitted: bool = False
    drawn: np.ndarray | None = field(default=None, compare=False)
    attempt: Any = field(default=None, compare=False)  # the scored AttemptRecord, for the reveal text
    progress: tuple[tuple[str, float | None, bool | None], ...] = ()  # (label, dice, correct)
    recent_submits: tuple[float, ...] = ()  # time.monotonic() of this session's submits in the last minute


def student_id(pseudonym: str, browser_id: str | None) -> tuple[str, str]:
    """(id used for the attempt, browser id to remember): the pseudonym if given, else anon-<hex>."""
    remembered = browser_id or f"anon-{secrets.token_hex(4)}"
    return (pseudonym.strip() or remembered), remembered


def drawn_mask(editor: dict[str, Any] | None, size: tuple[int, int]) -> np.ndarray | None:
    """(H, W) bool mask from an ImageEditor value: alpha > 0 on any layer, resized to `size` (nearest)."""
    layers = (editor or {}).get("layers") or []
    if not layers:
        return None
    alpha = np.zeros(np.asarray(layers[0]).shape[:2], bool)
    for layer in layers:
        array = np.asarray(layer)
        if array.ndim == 3 and array.shape[2] == 4 and array.shape[:2] == alpha.shape:
            alpha |= array[..., 3] > 0
    if alpha.shape != size:
        resized = PILImage.fromarray(alpha.astype(np.uint8) * 255).resize(
            (size[1], size[0]), PILImage.NEAREST
        )
        alpha = np.asarray(resized) > 0
    return alpha


def comparison_image(case: CaseRecord, question: QuestionRecord, masks: dict[str, np.ndarray | None],
                     shown: list[str]) -> np.ndarray:  # fmt: skip
    """The case image with the chosen layers ('student', 'model', 'reference') in their colours."""
    rgb = case.images[0].rgb()
    for name in LAYERS:
        mask = masks.get(name)
        if name in shown and mask is not None and mask.shape == rgb.shape[:2]:
            rgb = overlay_mask(rgb, mask, color=LAYER_COLORS[name], opacity=0.3, style="fill + outline")
    return rgb


def progress_figure(progress: tuple[tuple[str, float | None, bool | None], ...]) -> go.Figure:
    """Dice per segmentation attempt and right/wrong per answered question, in attempt order."""
    fig = go.Figure()
    n = list(range(1, len(progress) + 1))
    dice = [(i, d) for i, (_l, d, _c) in zip(n, progress, strict=True) if d is not None]
    right = [(i, 1.0 if c else 0.0) for i, (_l, _d, c) in zip(n, progress, strict=True) if c is not None]
    if dice:
        fig.add_scatter(x=[i for i, _ in dice], y=[d for _, d in dice], mode="lines+markers", name="Dice",
                        marker={"color": "rgb(230,159,0)"})  # fmt: skip
    if right:
        fig.add_scatter(x=[i for i, _ in right], y=[c for _, c in right], mode="markers", name="answer right (1)",
                        marker={"color": "rgb(0,114,178)", "symbol": "diamond", "size": 10})  # fmt: skip
    fig.update_layout(title="This session", xaxis_title="attempt", yaxis={"range": [-0.05, 1.05]}, height=280,
                      margin={"l": 40, "r": 10, "t": 40, "b": 40})  # fmt: skip
    fig.update_xaxes(tick0=1, dtick=1, tickformat="d", range=[0.5, max(len(progress), 1) + 0.5])  # whole attempts
    return fig


VERDICT_TEXT = {
    CORRECT: "✅ correct", PARTLY: "🟡 partly correct: see the reference for what is missing",
    WRONG: "❌ wrong: compare with the reference below",
}  # fmt: skip


def hidden_terms(question: QuestionRecord) -> tuple[str, ...]:
    """What the header must not show while `question` is open: its answers and answer-key concepts."""
    return protected_terms(question.kind, question.key(), question.choices)


def quiz_header(case: CaseRecord, question: QuestionRecord) -> str:
    """The unknown-case header for one question, with whatever the question asks about hidden ('…')."""
    return redact(case_markdown(case, reveal=False), hidden_terms(question))


class QuizHandlers:
    """Event handlers of the quiz tab (plain methods: tested without a browser)."""

    def __init__(self, store: CaseStore, engine: Any | None = None) -> None:
        """engine: the portal's loaded engine, used to answer questions that have no cached model output."""
        self.store = store
        self.engine = engine

    @refusing(3 + N_VIEW)
    def start(self, choice: int | None, state: QuizState) -> tuple:
        """Open a case (RANDOM_CASE = any published case) at its first question."""
        case = self._pick(choice)
        questions = [(f"{q.kind}: {q.prompt}", q.id) for q in case.questions]
        first = case.questions[0]
        new = replace(state, case_id=case.id, question_id=first.id, started=time.monotonic(), submitted=False,
                      drawn=None)  # fmt: skip
        return (new, quiz_header(case, first), gr.update(choices=questions, value=first.id),
                *self._question_view(case, first))  # fmt: skip

    @refusing(2 + N_VIEW)
    def choose_question(self, question_id: int | None, state: QuizState) -> tuple:
        """Switch question; the header is redrawn because each question hides its own answer."""
        if question_id is None or state.case_id is None:
            return (state, gr.skip(), *self._blank_question())
        case = self._case(state.case_id)
        question = self._question(case, int(question_id))
        new = replace(state, question_id=question.id, started=time.monotonic(), submitted=False, drawn=None)
        return (new, quiz_header(case, question), *self._question_view(case, question))

    @refusing(7)
    def submit(self, choice: str | None, text: str, editor: dict | None, pseudonym: str, browser_id: str | None,
               state: QuizState) -> tuple:  # fmt: skip
        """Score and store the attempt, then reveal the answers, masks and discussion."""
        if state.question_id is None or state.case_id is None:
            raise UserMistake("Press Start to get a case first.")
        if state.submitted:
            raise UserMistake("Already submitted: pick another question or press Start for a new case.")
        now = time.monotonic()
        recent = tuple(t for t in state.recent_submits if now - t < 60.0)
        if len(recent) >= SESSION_ATTEMPTS_PER_MINUTE:
            raise UserMistake(TOO_FAST.format(n=SESSION_ATTEMPTS_PER_MINUTE))
        case = self._case(state.case_id)
        question = self._question(case, state.question_id)
        answer = (choice or "") if question.kind == "closed" else (text or "")
        mask = drawn_mask(editor, (case.images[0].height, case.images[0].width))
        if question.kind == "segmentation" and (mask is None or not mask.any()):
            raise UserMistake("Draw the structure on the image with the brush before submitting.")
        if question.kind != "segmentation" and not answer.strip():
            raise UserMistake("Give your answer first: predict, then reveal.")
        student, remembered = student_id(pseudonym, browser_id)
        try:
            attempt = self.store.record_attempt(question.id, student, answer,
                                                mask if question.kind == "segmentation" else None,
                                                duration_s=round(time.monotonic() - state.started, 1))  # fmt: skip
        except CaseStoreError as error:  # too long, too many answers a minute...
            raise UserMistake(str(error)) from None
        label = f"#{case.id} {question.kind}"
        new = replace(
            state,
            submitted=True,
            drawn=mask,
            attempt=attempt,
            progress=(*state.progress, (label, attempt.dice, attempt.correct)),
            recent_submits=(*recent, now),
        )
        shown = list(LAYERS)
        return (new, remembered, self._result_markdown(question, attempt), self._compare(case, question, mask, shown),
                gr.update(value=shown, visible=question.kind == "segmentation"), case_markdown(case),
                progress_figure(new.progress))  # fmt: skip

    @refusing(2)
    def reveal_model(self, shown: list[str], state: QuizState) -> tuple[Any, Any]:
        """After submit: compute the model's answer when none is cached (model queue), then redo the reveal.

        Returns (result markdown, comparison image); both unchanged when nothing had to be computed.
        """
        if self.engine is None or not state.submitted or state.case_id is None or state.question_id is None:
            return gr.skip(), gr.skip()
        case = self._case(state.case_id)
        question = self._question(case, state.question_id)
        if cached_answer(self.store, question.id) is not None:  # cached meanwhile (e.g. another student)
            return gr.skip(), gr.skip()
        try:
            live_answer(self.store, self.engine, case, question)
        except Exception as error:  # the UI boundary: keep the reveal and keep serving
            logger.exception("live model answer for question %s failed", question.id)
            failed = MODEL_FAILED.format(kind=type(error).__name__)
            return self._result_markdown(question, state.attempt, failed), gr.skip()
        return (self._result_markdown(question, state.attempt),
                self._compare(case, question, state.drawn, shown or []))  # fmt: skip

    @refusing(1)
    def toggle(self, shown: list[str], state: QuizState) -> Any:
        if not state.submitted or state.case_id is None or state.question_id is None:
            return None
        case = self._case(state.case_id)
        return self._compare(case, self._question(case, state.question_id), state.drawn, shown or [])

    # -------------------------------------------------------------------------------------- helpers

    def _compare(
        self, case: CaseRecord, question: QuestionRecord, drawn: np.ndarray | None, shown: list[str]
    ) -> np.ndarray:
        reference = case.images[0].mask(question.target_label).array() if question.target_label else None
        output = cached_answer(self.store, question.id)
        model = output.mask() if output is not None else None
        return comparison_image(
            case, question, {"student": drawn, "model": model, "reference": reference}, shown
        )

    def _result_markdown(self, question: QuestionRecord, attempt: Any, model_note: str | None = None) -> str:
        lines = []
        if attempt.dice is not None:
            lines.append(f"### Dice **{attempt.dice:.3f}** · IoU **{attempt.iou:.3f}**")
            lines.append("Colours: <b style='color:#E69F00'>you</b> · <b style='color:#56B4E9'>model</b> · "
                         "<b style='color:#009E73'>reference</b>")  # fmt: skip
        verdict = VERDICT_TEXT.get(attempt.verdict or "", "compare your answer with the reference")
        if question.kind != "segmentation":
            lines.append(f"**Your answer:** {plain(attempt.answer)} — {verdict}")
        lines.append(f"**Reference answer:** {plain(question.reference_answer)}")
        if question.synonyms:
            lines.append(f"*Also accepted:* {plain(', '.join(question.synonyms))}")
        output = cached_answer(self.store, question.id)
        if output is not None:
            lines.append(f"**Model answer** ({plain(output.model_id)}): {plain(_answer_text(output))}")
        else:
            lines.append(model_note or (MODEL_PENDING if self.engine is not None else NO_MODEL_OUTPUT))
        return "\n\n".join(lines)

    def _question_view(self, case: CaseRecord, question: QuestionRecord) -> tuple:
        rgb = case.images[0].rgb()
        editor = {"background": rgb, "layers": [], "composite": rgb}
        seg = question.kind == "segmentation"
        return (
            f"**Question ({question.kind}).** {plain(question.prompt)}",
            gr.update(choices=list(question.choices), value=None, visible=question.kind == "closed"),
            gr.update(value="", visible=question.kind == "open"),
            gr.update(value=editor, label="Draw the structure (brush)" if seg else "Case image"),
            "", None, gr.update(value=[], visible=False), "",
        )  # fmt: skip

    def _blank_question(self) -> tuple:
        return ("", gr.update(visible=False), gr.update(visible=False), gr.update(), "", None,
                gr.update(visible=False), "")  # fmt: skip

    def _pick(self, choice: int | None) -> CaseRecord:
        if choice in (None, RANDOM_CASE):
            published = self.store.list_cases()
            if not published:
                raise UserMistake("There is no published case yet.")
            return self._case(random.choice(published).id)
        return self._case(int(choice))

    def _case(self, case_id: int) -> CaseRecord:
        try:
            return self.store.get_case(case_id)
        except CaseNotFound as error:  # e.g. deleted by an instructor meanwhile
            raise UserMistake(str(error)) from None

    @staticmethod
    def _question(case: CaseRecord, question_id: int) -> QuestionRecord:
        try:
            return case.question(question_id)
        except KeyError:
            raise UserMistake("This question is no longer in the case: press Start again.") from None


def _answer_text(output: Any) -> str:
    """The model's words; a mask-only answer (just `<SEG>`) says so instead of looking empty."""
    if output.answer.strip():
        return output.answer
    return "(a mask only: see the model layer)" if output.mask_png is not None else "(empty)"


def case_options(store: CaseStore) -> list[tuple[str, int]]:
    """Quiz case menu: 'Random case' then published cases WITHOUT titles or anatomy (they give answers)."""
    return [("Random case", RANDOM_CASE)] + [
        (f"#{c.id} · {c.modality} · {c.difficulty}", c.id) for c in store.list_cases()
    ]


def build_quiz_tab(ctx: Any) -> None:
    """Quiz UI inside the current gr.Tab."""
    if ctx.store is None:
        gr.Markdown(NO_STORE)
        return
    engine = getattr(ctx, "engine", None)
    h = QuizHandlers(ctx.store, engine)
    state = gr.State(QuizState())
    browser_id = gr.BrowserState("", storage_key="medplib-quiz-student")
    with gr.Row():
        pseudonym = gr.Textbox(label="Pseudonym", placeholder=PSEUDONYM_HELP, max_length=80, scale=2)
        choice = gr.Dropdown(
            case_options(ctx.store), value=RANDOM_CASE, label="Case", scale=2, elem_id="quiz-case"
        )
        start = gr.Button("Start", variant="primary", scale=1, elem_id="quiz-start")
    header = gr.Markdown(elem_id="quiz-header")
    question = gr.Radio([], label="Question", elem_id="quiz-question")
    with gr.Row():
        with gr.Column():
            prompt = gr.Markdown(elem_id="quiz-prompt")
            editor = gr.ImageEditor(
                type="numpy", label="Case image", sources=(), transforms=(), elem_id="quiz-editor",
                brush=gr.Brush(colors=[BRUSH_COLOR], color_mode="fixed", default_size=8),
                layers=gr.LayerOptions(allow_additional_layers=False, layers=["mask"]),
                format="png", height=420,
            )  # fmt: skip
            closed = gr.Radio([], label="Your answer", visible=False, elem_id="quiz-choice")
            opened = gr.Textbox(label="Your answer", visible=False, elem_id="quiz-text", max_length=MAX_ANSWER_CHARS)
            submit = gr.Button("Submit and reveal", variant="primary", elem_id="quiz-submit")
        with gr.Column():
            result = gr.Markdown(elem_id="quiz-result")
            compare = gr.Image(
                label="You / model / reference", type="numpy", interactive=False, elem_id="quiz-compare"
            )
            layers = gr.CheckboxGroup(list(LAYERS), value=[], label="Show", visible=False)
            plot = gr.Plot(label="Progress")
    discussion = gr.Markdown(elem_id="quiz-discussion")
    view = [prompt, closed, opened, editor, result, compare, layers, discussion]
    start.click(h.start, [choice, state], [state, header, question, *view], api_name="quiz_start")
    question.input(h.choose_question, [question, state], [state, header, *view], api_name="quiz_question")
    submitted = submit.click(h.submit, [closed, opened, editor, pseudonym, browser_id, state],
                             [state, browser_id, result, compare, layers, discussion, plot], api_name="quiz_submit")  # fmt: skip
    if engine is not None:  # a missing model answer is computed in the model queue the Ask tab uses
        submitted.success(h.reveal_model, [layers, state], [result, compare], api_visibility="private",
                          **ctx.model_queue())  # fmt: skip
    layers.change(h.toggle, [layers, state], compare, api_visibility="private")
