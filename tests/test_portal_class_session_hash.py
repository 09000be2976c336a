"""Class sessions and Ask-tab drafts take instructor rights from the login cookie only (issues 17 and 21).

Bug: the Class sessions tab and "Save as a case draft" kept the instructor's `cases.InstructorSession` in
a shared gr.State, i.e. under Gradio's client-chosen session_hash. A second client that reused an
instructor's session_hash (it travels in /queue/data URLs) could create or close class sessions, read
the dashboard and CSV, and save case drafts. The handlers now resolve the session from the request's
HttpOnly cookie (`InstructorGate.bind`). The private class-tab events are driven here the way a browser
drives them (raw /queue/join with a fn_index), since gradio_client refuses private endpoints.

Also pins the public API of class_tab.py and ask_extras.py: named endpoints with named parameters,
every other event private.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from portal_helpers import load_test_engine, portal_context
from pydicom.data import get_testdata_file

from cases import CaseStore
from cases.classroom import Classroom
from cases.samples import sample_draft
from portal.app import build_app, launch_kwargs
from portal.ask_extras import build_ask_extras
from portal.class_tab import build_class_tab
from portal.context import PortalContext, PortalSettings
from portal.instructor_auth import COOKIE_NAME, LOGIN_PATH

PASSWORD = "class-cookie-test-pw"
PORT = 7902
QUEUE_TIMEOUT_S = 60.0
CLASS_ENDPOINTS = {"/class_join": ["code", "pseudonym"], "/class_answer": ["choice", "text", "editor"]}
EXTRA_ENDPOINTS = {"/mask_dicom_seg": [], "/segment_volume": ["question"], "/save_case_draft": ["title"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, CaseStore, int]]:
    store = CaseStore(str(tmp_path_factory.mktemp("hash") / "hash.sqlite"), seed_starter=False)
    op = store.operator_session()
    case = store.create_case(op, sample_draft("Hash lesion", size=(40, 40)))
    store.create_instructor(op, "teacher", PASSWORD)
    ctx = dataclasses.replace(portal_context(load_test_engine()), store=store)
    demo = build_app(ctx)
    demo.launch(server_name="127.0.0.1", server_port=PORT, prevent_thread_lock=True, quiet=True,
                **launch_kwargs(ctx.settings, store))  # fmt: skip
    try:
        yield f"http://127.0.0.1:{PORT}", demo, store, case.id
    finally:
        demo.close()
        store.close()


def _cookie(url: str) -> str:
    reply = httpx.post(url + LOGIN_PATH, json={"username": "teacher", "password": PASSWORD})
    assert reply.status_code == 200
    return reply.cookies[COOKIE_NAME]


def _fn_index(demo: gr.Blocks, name: str) -> int:
    [index] = [i for i, fn in demo.fns.items() if fn.name == name]
    return index


def _queue_call(url: str, session_hash: str, fn_index: int, data: list[Any], cookie: str | None) -> dict:
    """One event as the browser sends it: POST /queue/join, then read /queue/data until it completes."""
    cookies = {COOKIE_NAME: cookie} if cookie else {}
    with httpx.Client(base_url=url, cookies=cookies, timeout=QUEUE_TIMEOUT_S) as http:
        body = {"data": data, "fn_index": fn_index, "session_hash": session_hash, "event_data": None}
        joined = http.post("/gradio_api/queue/join", json=body)
        joined.raise_for_status()
        event_id = joined.json()["event_id"]
        deadline = time.monotonic() + QUEUE_TIMEOUT_S
        with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
            for line in stream.iter_lines():
                if time.monotonic() > deadline:
                    break
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("event_id") == event_id and message.get("msg") == "process_completed":
                    return message
    raise AssertionError(f"event {event_id} did not complete in {QUEUE_TIMEOUT_S} s")


def _refused(message: dict) -> bool:
    return not message["success"] and "instructor action" in str(message["output"].get("error", ""))


def test_reused_session_hash_cannot_run_class_sessions(served) -> None:
    url, demo, store, case_id = served
    cookie, session_hash = _cookie(url), "hash-seen-in-a-url"
    created = _queue_call(url, session_hash, _fn_index(demo, "create"), ["Week 2", [case_id]], cookie)
    assert created["success"], created
    code = re.search(r"Session \*\*(\w+)\*\*", created["output"]["data"][0]).group(1)
    index = {name: _fn_index(demo, name) for name in ("create", "close_session", "dashboard", "save_key")}
    teacher_view = _queue_call(url, session_hash, index["dashboard"], [code], cookie)
    assert teacher_view["success"] and "code **" in teacher_view["output"]["data"][0]

    intruder = {  # same session_hash, no cookie
        "create": ["Stolen", [case_id]],
        "close_session": [code],
        "dashboard": [code],
        "save_key": [None, '{"accepted": ["x"]}'],
    }
    for name, data in intruder.items():
        assert _refused(_queue_call(url, session_hash, index[name], data, None)), name
    sessions = Classroom(store).list_sessions(store.operator_session())
    assert [(s.code, s.is_open) for s in sessions] == [(code, True)]  # nothing created, nothing closed


def test_reused_session_hash_cannot_save_a_case_draft(served) -> None:
    url, _demo, store, _case_id = served
    teacher = Client(url, headers={"Cookie": f"{COOKIE_NAME}={_cookie(url)}"}, verbose=False)
    teacher.predict(handle_file(get_testdata_file("CT_small.dcm")), False, api_name="/load_image")
    teacher.predict("Please segment the bone in this image.", "None", None, 0.5, "fill + outline", "orange",
                    api_name="/segment")  # fmt: skip
    intruder = Client(url, verbose=False)
    intruder.session_hash = teacher.session_hash
    assert intruder.predict(api_name="/mask_dicom_seg")  # the Ask tab's state IS shared under the hash...
    before = len(store.list_cases(include_unpublished=True))
    with pytest.raises(AppError, match="instructor action"):
        intruder.predict("Stolen draft", api_name="/save_case_draft")  # ...the instructor rights are not
    assert len(store.list_cases(include_unpublished=True)) == before
    assert "Saved unpublished draft" in teacher.predict("Teacher draft", api_name="/save_case_draft")
    assert len(store.list_cases(include_unpublished=True)) == before + 1


def test_class_and_ask_extras_events_are_named_or_private(tmp_path: Path) -> None:
    """No lambda*, *_N endpoints or value_N/param_N parameters from class_tab.py and ask_extras.py."""
    store = CaseStore(str(tmp_path / "api.sqlite"), seed_starter=False)
    ctx = PortalContext(engine=None, store=store, settings=PortalSettings())
    with gr.Blocks() as demo:
        ask_session, upload, question = gr.State(None), gr.File(), gr.Textbox(label="Question")
        build_ask_extras(ctx, ask_session, upload, question)
        build_class_tab(ctx)
    named = {name: [p["parameter_name"] for p in info["parameters"]]
             for name, info in demo.get_api_info()["named_endpoints"].items()}  # fmt: skip
    assert named == {**CLASS_ENDPOINTS, **EXTRA_ENDPOINTS}
    assert not demo.get_api_info()["unnamed_endpoints"]
    for fn in demo.fns.values():
        assert fn.api_visibility == "private" or "/" + str(fn.api_name) in named, fn.api_name
    store.close()
