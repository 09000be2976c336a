"""Class sessions tab: students join with a code and take the session's quiz; instructors run the session.

Students: code + pseudonym → Join → each question once (closed: pick, open: type, segmentation: draw);
the verdict (correct / partly correct / wrong) and the reference are shown after each answer.
Instructors (logged in once on the Instructor tab: the HttpOnly cookie, read here through
`InstructorGate.bind`; Refresh or opening the accordion picks the login up): create a session from
published cases, open/close it, read the plotly dashboard, download the CSV, edit answer keys. Every
instructor action is checked by the store as well, not only hidden here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

import gradio as gr
import plotly.graph_objects as go

from cases import CaseStore, CaseStoreError, InstructorSession
from cases.classroom import Classroom, SessionResults
from cases.marking import AnswerKey
from portal.instructor_access import instructor_gate, require_instructor
from portal.instructor_auth import InstructorGate
from portal.library_tab import HANDOFF_DIR, NO_STORE, temp_file
from portal.quiz_tab import VERDICT_TEXT, drawn_mask
from portal.safe_text import plain

NEEDS_LOGIN = "This is an instructor action: log in on the Instructor tab first, then press Refresh here."
SIGNED_OUT = "Not logged in as an instructor: log in on the **Instructor** tab, then press **Refresh** here."
SIGNED_IN = "Logged in as **{name}** (on the Instructor tab)."
JOINED = "Joined **{title}** as **{name}**: {n} questions. Pick one below."
COLORS = {"correct": "rgb(0,158,115)", "partly correct": "rgb(240,228,66)", "wrong": "rgb(213,94,0)"}


@dataclass(frozen=True)
class StudentState:
    """One browser's place in a class session."""

    code: str = ""
    pseudonym: str = ""
    question_id: int | None = None
    started: float = 0.0


def _question_label(kind: str, prompt: str, k: int) -> str:
    return f"{k + 1}. {kind}: {prompt}"


class ClassHandlers:
    """Event handlers (plain methods: tested without a browser).

    Instructor handlers take the session first: `InstructorGate.bind` resolves it from the login cookie
    of each request (None for everyone else), and the store checks it again.
    """

    def __init__(self, store: CaseStore) -> None:
        self.store = store
        self.room = Classroom(store)

    # ---- instructor ------------------------------------------------------------------------------
    def refresh(self, session: InstructorSession | None) -> tuple:
        """(status, session menu, cases to pick, cases with keys): after a login on the Instructor tab."""
        cases = gr.update(choices=self.case_choices(include_unpublished=False))
        if not self.store.is_instructor(session):
            return SIGNED_OUT, self.session_menu(None), cases, cases
        keyed = gr.update(choices=self.case_choices(include_unpublished=True))
        return SIGNED_IN.format(name=plain(session.username)), self.session_menu(session), cases, keyed

    def case_choices(self, *, include_unpublished: bool) -> list[tuple[str, int]]:
        """Dropdown choices of cases; sessions can only use published ones."""
        return [(f"#{c.id} {c.title}{'' if c.published else ' [unpublished]'}", c.id)
                for c in self.store.list_cases(include_unpublished=include_unpublished)]  # fmt: skip

    def session_menu(self, session: InstructorSession | None) -> Any:
        if not self.store.is_instructor(session):
            return gr.update(choices=[], value=None)
        rows = self.room.list_sessions(session)
        choices = [(f"{r.code} · {r.title} · {'open' if r.is_open else 'closed'} · {r.n_students} students", r.code)
                   for r in rows]  # fmt: skip
        return gr.update(choices=choices, value=rows[0].code if rows else None)

    def create(self, session: InstructorSession | None, title: str, case_ids: list[int] | None) -> tuple:
        """A session over every question of the chosen cases, in case order."""
        try:
            session = require_instructor(self.store, session, NEEDS_LOGIN)
            ids = [q.id for c in (case_ids or []) for q in self.store.get_case(int(c), session).questions]
            record = self.room.create_session(session, title or "", ids)
        except CaseStoreError as err:
            raise gr.Error(str(err)) from err
        note = f"Session **{record.code}** is open: students join with this code ({len(ids)} questions)."
        return note, self.session_menu(session)

    def open_session(self, session: InstructorSession | None, code: str | None) -> tuple:
        return self.set_open(session, code, True)

    def close_session(self, session: InstructorSession | None, code: str | None) -> tuple:
        return self.set_open(session, code, False)

    def set_open(self, session: InstructorSession | None, code: str | None, is_open: bool) -> tuple:
        try:
            session = require_instructor(self.store, session, NEEDS_LOGIN)
            record = self.room.set_open(session, code or "", is_open)
        except CaseStoreError as err:
            raise gr.Error(str(err)) from err
        return f"Session {record.code} is now {'open' if record.is_open else 'closed'}.", self.session_menu(session)

    def dashboard(self, session: InstructorSession | None, code: str | None) -> tuple:
        """(summary, share figure, Dice/IoU figure, progress figure, wrong-answer rows, CSV file)."""
        try:
            session = require_instructor(self.store, session, NEEDS_LOGIN)
            results = self.room.results(session, code or "")
            csv_text = self.room.results_csv(session, code or "")
        except CaseStoreError as err:
            raise gr.Error(str(err)) from err
        path = temp_file(HANDOFF_DIR, f"class-{results.session.code}.csv")
        path.write_text(csv_text, encoding="utf-8")
        return (summary_markdown(results), share_figure(results), overlap_figure(results),
                progress_figure(results), wrong_rows(results), str(path))  # fmt: skip

    def load_key(self, session: InstructorSession | None, question_id: int | None) -> str:
        """The question's answer key as editable JSON (its reference and synonyms when it has none)."""
        if not self.store.is_instructor(session) or question_id is None:
            return ""
        question = self._question(int(question_id))
        return json.dumps(question.key().to_json(), indent=1, ensure_ascii=False)

    def save_key(self, session: InstructorSession | None, question_id: int | None, key_json: str) -> str:
        try:
            session = require_instructor(self.store, session, NEEDS_LOGIN)
            if question_id is None:
                raise gr.Error("Choose a question first.")
            key = AnswerKey.from_json(json.loads(key_json or "{}"))
            self.store.set_answer_key(session, int(question_id), key)
        except json.JSONDecodeError as err:
            raise gr.Error(f"The key is not valid JSON: {err}") from err
        except CaseStoreError as err:
            raise gr.Error(str(err)) from err
        return "Answer key saved: new answers are marked with it."

    def key_questions(self, session: InstructorSession | None, case_id: int | None) -> Any:
        if not self.store.is_instructor(session) or case_id is None:
            return gr.update(choices=[], value=None)
        try:
            case = self.store.get_case(int(case_id), session)
        except CaseStoreError as err:
            raise gr.Error(str(err)) from err
        choices = [(_question_label(q.kind, q.prompt, k), q.id) for k, q in enumerate(case.questions)
                   if q.kind != "segmentation"]  # fmt: skip
        return gr.update(choices=choices, value=choices[0][1] if choices else None)

    def _question(self, question_id: int) -> Any:
        try:
            return self.room.question(question_id, published_only=False)
        except CaseStoreError as err:
            raise gr.Error(str(err)) from err

    # ---- students --------------------------------------------------------------------------------
    def join(self, code: str, pseudonym: str, state: StudentState) -> tuple:
        try:
            record = self.room.join(code, pseudonym)
        except CaseStoreError as err:
            raise gr.Error(str(err)) from err
        new = replace(state, code=record.code, pseudonym=pseudonym.strip(), question_id=None)
        note = JOINED.format(title=record.title, name=new.pseudonym, n=len(record.question_ids))
        return new, note, gr.update(choices=self._choices(new, record.question_ids), value=None)

    def _choices(self, state: StudentState, question_ids: tuple[int, ...]) -> list[tuple[str, int]]:
        """The session's questions, those already answered ticked (two queries, whatever the library size)."""
        done = self.room.answered(state.code, state.pseudonym)
        return [(f"{k + 1}. {q.kind}: {q.prompt}{' ✓' if q.id in done else ''}", q.id)
                for k, q in enumerate(self.room.session_questions(state.code))]  # fmt: skip

    def _public_question(self, question_id: int) -> tuple[Any, Any]:
        try:
            question = self.room.question(question_id)
            return question, self.store.get_case(question.case_id)
        except CaseStoreError as err:
            raise gr.Error(str(err)) from err

    def choose(self, question_id: int | None, state: StudentState) -> tuple:
        if question_id is None or not state.code:
            return state, "", gr.update(visible=False), gr.update(visible=False), gr.update(), ""
        question, case = self._public_question(int(question_id))
        rgb = case.images[0].rgb()
        new = replace(state, question_id=question.id, started=time.monotonic())
        return (new, f"**{question.kind}.** {question.prompt}",
                gr.update(choices=list(question.choices), value=None, visible=question.kind == "closed"),
                gr.update(value="", visible=question.kind == "open"),
                {"background": rgb, "layers": [], "composite": rgb}, "")  # fmt: skip

    def submit(self, choice: str | None, text: str, editor: dict | None, state: StudentState) -> tuple:
        if not state.code or state.question_id is None:
            raise gr.Error("Join a session and pick a question first.")
        question, case = self._public_question(state.question_id)
        answer = (choice or "") if question.kind == "closed" else (text or "")
        mask = None
        if question.kind == "segmentation":
            mask = drawn_mask(editor, (case.images[0].height, case.images[0].width))
            if mask is None or not mask.any():
                raise gr.Error("Draw the structure on the image with the brush before submitting.")
        elif not answer.strip():
            raise gr.Error("Give your answer first: predict, then reveal.")
        try:
            attempt = self.room.answer(state.code, state.pseudonym, question.id, answer, mask,
                                       duration_s=round(time.monotonic() - state.started, 1))  # fmt: skip
        except CaseStoreError as err:
            raise gr.Error(str(err)) from err
        lines = []
        if attempt.dice is not None:
            lines.append(f"Dice **{attempt.dice:.3f}** · IoU **{attempt.iou:.3f}**")
        else:
            lines.append(f"**Your answer:** {attempt.answer} — {VERDICT_TEXT.get(attempt.verdict or '', '')}")
        lines.append(f"**Reference answer:** {question.reference_answer}")
        record = self.room.join(state.code, state.pseudonym)
        return "\n\n".join(lines), gr.update(choices=self._choices(state, record.question_ids))


# ------------------------------------------------------------------------------------------- figures


def summary_markdown(results: SessionResults) -> str:
    s = results.session
    answered = sum(q.n_answers for q in results.questions)
    return (f"**{s.title}** · code **{s.code}** · {'open' if s.is_open else 'closed'} · "
            f"{len(results.students)} students · {answered} answers")  # fmt: skip


def _short(prompt: str, k: int) -> str:
    return f"Q{k + 1}: {prompt[:40]}{'…' if len(prompt) > 40 else ''}"


def share_figure(results: SessionResults) -> go.Figure:
    """Stacked bars: share correct / partly correct / wrong per answered question."""
    fig = go.Figure()
    marked = [(k, q) for k, q in enumerate(results.questions) if q.share_correct is not None]
    labels = [_short(q.prompt, k) for k, q in marked]
    for name, attr in (("correct", "share_correct"), ("partly correct", "share_partly"), ("wrong", "share_wrong")):
        fig.add_bar(x=labels, y=[getattr(q, attr) for _, q in marked], name=name, marker_color=COLORS[name])
    fig.update_layout(barmode="stack", title="Share of answers per question", yaxis={"range": [0, 1], "tickformat": ".0%"},
                      height=320, margin={"l": 40, "r": 10, "t": 40, "b": 80})  # fmt: skip
    return fig


def overlap_figure(results: SessionResults) -> go.Figure:
    """Box plots (with every point) of Dice and IoU per segmentation question."""
    fig = go.Figure()
    for k, q in enumerate(results.questions):
        if q.dice:
            fig.add_box(y=list(q.dice), name=f"{_short(q.prompt, k)} Dice", boxpoints="all", marker_color="rgb(230,159,0)")
            fig.add_box(y=list(q.iou), name=f"{_short(q.prompt, k)} IoU", boxpoints="all", marker_color="rgb(86,180,233)")
    fig.update_layout(title="Dice / IoU of the drawings", yaxis={"range": [0, 1.02]}, height=320, showlegend=False,
                      margin={"l": 40, "r": 10, "t": 40, "b": 80})  # fmt: skip
    return fig


def progress_figure(results: SessionResults) -> go.Figure:
    """Per student: questions answered correct / partly / other, out of the session's questions."""
    fig = go.Figure()
    names = [s.pseudonym for s in results.students]
    fig.add_bar(x=names, y=[s.correct for s in results.students], name="correct", marker_color=COLORS["correct"])
    fig.add_bar(x=names, y=[s.partly for s in results.students], name="partly correct", marker_color=COLORS["partly correct"])
    fig.add_bar(x=names, y=[s.answered - s.correct - s.partly for s in results.students], name="wrong or drawn",
                marker_color="rgb(150,150,150)")  # fmt: skip
    total = len(results.session.question_ids)
    fig.update_layout(barmode="stack", title=f"Progress per student (of {total} questions)", height=320,
                      yaxis={"range": [0, max(total, 1)], "dtick": 1}, margin={"l": 40, "r": 10, "t": 40, "b": 80})  # fmt: skip
    return fig


def wrong_rows(results: SessionResults) -> list[list[Any]]:
    """[question, wrong answer, count] rows, most common first within each question."""
    return [[_short(q.prompt, k), answer, count] for k, q in enumerate(results.questions)
            for answer, count in q.common_wrong]  # fmt: skip


# -------------------------------------------------------------------------------------------- layout


def build_class_tab(ctx: Any, gate: InstructorGate | None = None) -> None:
    """The Class sessions tab; instructor handlers get their session from `gate` (the login cookie).

    Without a gate one is built from the context, as the Instructor tab does.
    """
    if ctx.store is None:
        gr.Markdown(NO_STORE)
        return
    h = ClassHandlers(ctx.store)
    _student_section(h)
    with gr.Accordion("Instructor: run a class session", open=False, elem_id="class-instructor") as accordion:
        _instructor_section(h, gate or instructor_gate(ctx), accordion)


def _student_section(h: ClassHandlers) -> None:
    state = gr.State(StudentState())
    with gr.Row():
        code = gr.Textbox(label="Session code", max_length=12, scale=1, elem_id="class-code")
        pseudonym = gr.Textbox(label="Pseudonym (never your real name)", max_length=80, scale=2, elem_id="class-pseudonym")
        join = gr.Button("Join", variant="primary", scale=1, elem_id="class-join")
    joined = gr.Markdown(elem_id="class-joined")
    questions = gr.Radio([], label="Questions", elem_id="class-questions")
    prompt = gr.Markdown(elem_id="class-prompt")
    with gr.Row():
        with gr.Column():
            editor = gr.ImageEditor(type="numpy", label="Case image (draw with the brush for segmentation questions)",
                                    sources=(), transforms=(), format="png", height=380, elem_id="class-editor",
                                    brush=gr.Brush(colors=["#E69F00"], color_mode="fixed", default_size=8),
                                    layers=gr.LayerOptions(allow_additional_layers=False, layers=["mask"]))  # fmt: skip
        with gr.Column():
            closed = gr.Radio([], label="Your answer", visible=False, elem_id="class-choice")
            opened = gr.Textbox(label="Your answer", visible=False, elem_id="class-text")
            submit = gr.Button("Submit", variant="primary", elem_id="class-submit")
            result = gr.Markdown(elem_id="class-result")
    join.click(h.join, [code, pseudonym, state], [state, joined, questions], api_name="class_join")
    questions.input(h.choose, [questions, state], [state, prompt, closed, opened, editor, result],
                    api_visibility="private")  # fmt: skip
    submit.click(h.submit, [closed, opened, editor, state], [result, questions], api_name="class_answer")


def _instructor_section(h: ClassHandlers, gate: InstructorGate, accordion: gr.Accordion) -> None:
    with gr.Row():
        status = gr.Markdown(SIGNED_OUT, elem_id="class-status")
        refresh = gr.Button("Refresh", size="sm", scale=0, elem_id="class-refresh")
    published = h.case_choices(include_unpublished=False)
    with gr.Row():
        title = gr.Textbox(label="New session title", elem_id="class-title")
        chosen = gr.Dropdown(published, multiselect=True, label="Cases (all their questions)", elem_id="class-cases")
        create = gr.Button("Create session", variant="primary", elem_id="class-create")
    with gr.Row():
        menu = gr.Dropdown([], label="Session", elem_id="class-menu")
        open_btn, close_btn = gr.Button("Open", elem_id="class-open"), gr.Button("Close", elem_id="class-close")
        show = gr.Button("Dashboard and CSV", variant="primary", elem_id="class-dashboard")
    summary = gr.Markdown(elem_id="class-summary")
    with gr.Row():
        share = gr.Plot(label="Share correct", elem_id="class-share")
        overlap = gr.Plot(label="Dice / IoU", elem_id="class-overlap")
    progress = gr.Plot(label="Progress per student", elem_id="class-progress")
    wrong = gr.Dataframe(headers=["question", "wrong answer", "count"], label="Most common wrong answers",
                         interactive=False, elem_id="class-wrong")  # fmt: skip
    csv_file = gr.File(label="Results CSV", interactive=False, elem_id="class-csv")
    with gr.Accordion("Answer keys", open=False):
        key_case = gr.Dropdown(published, label="Case", elem_id="class-key-case")
        key_question = gr.Dropdown([], label="Question", elem_id="class-key-question")
        key_json = gr.Code(language="json", label='Key: {"accepted": [...], "concepts": [[...]], "need": n, "rejected": [...]}')
        save_key = gr.Button("Save key", elem_id="class-save-key")
        key_note = gr.Markdown()
    # Instructor events are private (the browser calls them; scripts get no endpoint) and every one
    # resolves its session from the request's cookie: a reused session_hash carries no rights.
    private, bind = {"api_visibility": "private"}, gate.bind
    for trigger in (refresh.click, accordion.expand):  # the login happens on the Instructor tab
        trigger(bind(h.refresh, 0), None, [status, menu, chosen, key_case], **private)
    create.click(bind(h.create, 2), [title, chosen], [status, menu], **private)
    open_btn.click(bind(h.open_session, 1), [menu], [status, menu], **private)
    close_btn.click(bind(h.close_session, 1), [menu], [status, menu], **private)
    show.click(bind(h.dashboard, 1), [menu], [summary, share, overlap, progress, wrong, csv_file], **private)
    key_case.input(bind(h.key_questions, 1), [key_case], key_question, **private)
    key_question.change(bind(h.load_key, 1), [key_question], key_json, **private)
    save_key.click(bind(h.save_key, 2), [key_question, key_json], key_note, **private)
