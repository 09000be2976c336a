"""Class sessions tab handlers without a browser (issue 21): join, answer, dashboard, keys, rights."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import numpy as np
import plotly.graph_objects as go
import pytest

from cases import CaseStore
from cases.samples import sample_draft
from portal.class_tab import ClassHandlers, StudentState

PASSWORD = "class-tab-test-password"


@pytest.fixture
def setup(tmp_path: Path):
    store = CaseStore(str(tmp_path / "c.sqlite"), seed_starter=False)
    op = store.operator_session()
    case = store.create_case(op, sample_draft(size=(40, 40)))
    store.create_instructor(op, "teacher", PASSWORD)
    h = ClassHandlers(store)
    login = store.login("teacher", PASSWORD)  # in the portal: the Instructor tab's cookie login
    return h, store, case, login


def test_students_answer_and_the_dashboard_reads_them(setup) -> None:
    h, store, case, login = setup
    note, _menu = h.create(login, "Tuesday", [case.id])
    code = note.split("**")[1]
    closed, seg, opened = case.questions
    for k, name in enumerate(["ann", "bob", "cy"]):
        state, joined, questions = h.join(code, name, StudentState())
        assert "3 questions" in joined and len(questions["choices"]) == 3
        state = h.choose(closed.id, state)[0]
        result, questions = h.submit("yes" if k else "no", "", None, state)
        assert "Reference answer" in result and questions["choices"][0][0].endswith("✓")
        state = h.choose(seg.id, state)[0]
        mask = case.images[0].mask("lesion").array()
        layer = np.zeros((40, 40, 4), np.uint8)
        layer[mask] = (230, 159, 0, 255)
        assert "Dice **1.000**" in h.submit(None, "", {"layers": [layer]}, state)[0]
    summary, share, overlap, progress, wrong, csv_path = h.dashboard(login, code)
    assert "3 students" in summary and all(isinstance(f, go.Figure) for f in (share, overlap, progress))
    assert wrong == [["Q1: Is a lesion present?", "no", 1]]
    assert len(Path(csv_path).read_text(encoding="utf-8").strip().splitlines()) == 1 + 6
    with pytest.raises(gr.Error, match="already answered"):
        h.submit("yes", "", None, h.choose(closed.id, h.join(code, "ann", StudentState())[0])[0])


def test_visitors_cannot_run_sessions_or_edit_keys(setup) -> None:
    h, store, case, login = setup
    with pytest.raises(gr.Error, match="instructor action"):
        h.create(None, "x", [case.id])
    with pytest.raises(gr.Error, match="instructor action"):
        h.save_key(None, case.questions[2].id, '{"accepted": ["x"]}')
    assert h.load_key(None, case.questions[2].id) == ""
    for act in (h.open_session, h.close_session, h.dashboard):
        with pytest.raises(gr.Error, match="instructor action"):
            act(None, "ABCDEF")
    store.logout(login)
    with pytest.raises(gr.Error, match="instructor action"):
        h.create(login, "after logout", [case.id])


def test_refresh_picks_up_the_login_made_on_the_instructor_tab(setup) -> None:
    """The Class tab has no login form of its own: Refresh shows the cookie's instructor and their sessions."""
    h, store, case, login = setup
    status, menu, cases, keyed = h.refresh(None)
    assert "Not logged in" in status and menu["choices"] == []
    assert cases["choices"] == [(f"#{case.id} {case.title}", case.id)]
    h.create(login, "Monday", [case.id])
    status, menu, cases, keyed = h.refresh(login)
    assert "Logged in as **teacher**" in status and menu["choices"][0][0].endswith("open · 0 students")
    store.set_published(login, case.id, False)
    assert h.refresh(login)[2]["choices"] == []  # sessions only use published cases
    assert h.refresh(login)[3]["choices"] == [(f"#{case.id} {case.title} [unpublished]", case.id)]


def test_instructors_edit_an_answer_key(setup) -> None:
    h, store, case, login = setup
    opened = case.questions[2]
    key = json.loads(h.load_key(login, opened.id))
    assert key["accepted"][0] == "round bright lesion"
    key["concepts"] = [["bright"], ["round", "disc"]]
    assert "saved" in h.save_key(login, opened.id, json.dumps(key))
    assert store.get_case(case.id).question(opened.id).answer_key.concepts == (("bright",), ("round", "disc"))
    with pytest.raises(gr.Error, match="not valid JSON"):
        h.save_key(login, opened.id, "{accepted")
